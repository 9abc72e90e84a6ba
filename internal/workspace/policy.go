package workspace

import (
	workspacev1 "github.com/metering/metering/gen/workspace/v1"
	"github.com/metering/metering/internal/auth"
)

// ScopeRuntime is the scope of the runtime tokens that CreateAgent and
// RotateAgentToken issue. It lets the agent's runtime worker create and
// delete the content of its account; it does not let it manage agents.
const ScopeRuntime = "workspace:write"

// Scopes returns every scope of the service tokens the workspace accepts.
func Scopes() []string {
	return []string{ScopeRuntime}
}

// Policy returns who may call each workspace method. Methods not listed are
// denied; the server adds the public health and reflection methods.
//
//   - Agents are managed by users: members and admins of the account create
//     and delete them and rotate their runtime tokens. Runtime workers may
//     not, so a leaked runtime token cannot mint more of them.
//   - Content (tasks, documents, messages, attachments) is created and
//     deleted by users and by the runtime workers of the account's agents.
//   - Operators (platform admins) are not members of an account and have no
//     access: they manage plans in Metering.
//
// Every rule is OwnAccount, so a caller bound to account A that names
// account B gets PERMISSION_DENIED.
func Policy() auth.Policy {
	users := auth.Rule{UserRoles: []string{auth.RoleMember, auth.RoleAdmin}, OwnAccount: true}
	usersAndRuntime := auth.Rule{
		UserRoles:  []string{auth.RoleMember, auth.RoleAdmin},
		Scopes:     []string{ScopeRuntime},
		OwnAccount: true,
	}

	return auth.Policy{
		workspacev1.AgentService_CreateAgent_FullMethodName:      users,
		workspacev1.AgentService_DeleteAgent_FullMethodName:      users,
		workspacev1.AgentService_RotateAgentToken_FullMethodName: users,

		workspacev1.TaskService_CreateTask_FullMethodName: usersAndRuntime,

		workspacev1.DocumentService_CreateDocument_FullMethodName:    usersAndRuntime,
		workspacev1.DocumentService_DuplicateDocument_FullMethodName: usersAndRuntime,
		workspacev1.DocumentService_UpsertDocument_FullMethodName:    usersAndRuntime,
		workspacev1.DocumentService_DeleteDocument_FullMethodName:    usersAndRuntime,

		workspacev1.MessageService_CreateMessage_FullMethodName:    usersAndRuntime,
		workspacev1.MessageService_UploadAttachment_FullMethodName: usersAndRuntime,
		workspacev1.MessageService_DeleteAttachment_FullMethodName: usersAndRuntime,
	}
}
