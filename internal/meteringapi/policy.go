package meteringapi

import (
	meteringv1 "github.com/metering/metering/gen/metering/v1"
	"github.com/metering/metering/internal/auth"
)

// Policy returns who may call each Metering method. Methods not listed are
// denied; the server adds the public health and reflection methods.
//
//   - Only service tokens with usage:write may change usage, so a user
//     cannot lower their own counts.
//   - Users (members and account admins) read their own account's usage, as
//     do tokens with usage:read, usage:write or admin, and operators.
//   - Admin methods need an operator or a token with the admin scope, which
//     is only issued for all accounts.
//
// OwnAccount rules deny a principal bound to one account any request that
// names another account.
func Policy() auth.Policy {
	write := auth.Rule{Scopes: []string{auth.ScopeUsageWrite}, OwnAccount: true}
	admin := auth.Rule{Operator: true, Scopes: []string{auth.ScopeAdmin}, OwnAccount: true}

	return auth.Policy{
		meteringv1.MeteringService_CheckAndReserve_FullMethodName: write,
		meteringv1.MeteringService_Commit_FullMethodName:          write,
		meteringv1.MeteringService_Release_FullMethodName:         write,
		meteringv1.MeteringService_RecordUsage_FullMethodName:     write,
		meteringv1.MeteringService_RecordDeletion_FullMethodName:  write,
		meteringv1.MeteringService_GetCurrentUsage_FullMethodName: {
			Operator:   true,
			UserRoles:  []string{auth.RoleMember, auth.RoleAdmin},
			Scopes:     []string{auth.ScopeUsageRead, auth.ScopeUsageWrite, auth.ScopeAdmin},
			OwnAccount: true,
		},

		meteringv1.MeteringAdminService_UpsertPlan_FullMethodName:         admin,
		meteringv1.MeteringAdminService_ListPlans_FullMethodName:          admin,
		meteringv1.MeteringAdminService_SetAccountPlan_FullMethodName:     admin,
		meteringv1.MeteringAdminService_GetAccount_FullMethodName:         admin,
		meteringv1.MeteringAdminService_ListReservations_FullMethodName:   admin,
		meteringv1.MeteringAdminService_AdjustUsage_FullMethodName:        admin,
		meteringv1.MeteringAdminService_IssueServiceToken_FullMethodName:  admin,
		meteringv1.MeteringAdminService_ListServiceTokens_FullMethodName:  admin,
		meteringv1.MeteringAdminService_RevokeServiceToken_FullMethodName: admin,
	}
}
