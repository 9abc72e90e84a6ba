package workspaceserver

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestNewPoolConfigSizesPool(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		databaseURL string
		maxConns    int32
	}{
		{"URL without pool_max_conns", "postgres://app@127.0.0.1:5432/metering", DefaultDatabaseMaxConns},
		{"URL with pool_max_conns", "postgres://app@127.0.0.1:5432/metering?pool_max_conns=7", 7},
		{"keyword/value with pool_max_conns", "host=127.0.0.1 user=app dbname=metering pool_max_conns=3", 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := newPoolConfig(tt.databaseURL)

			require.NoError(t, err)
			assert.Equal(t, tt.maxConns, cfg.MaxConns)
		})
	}

	_, err := newPoolConfig("postgres://app@127.0.0.1:5432/metering?pool_max_conns=none")
	assert.ErrorContains(t, err, "parse database URL")
}
