package workspaceserver_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	workspacev1 "github.com/metering/metering/gen/workspace/v1"
)

func TestStartupSweepRemovesUnusedFiles(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})
	account := s.newAccount("sweep")
	c := s.newCaller(t, "user", account)
	resp, err := upload(c.ctx, s.messages, account, &workspacev1.UploadHeader{MessageId: s.newMessage(t, c, account), FileName: "kept.bin", Size: 10},
		make([]byte, 10), 10)
	require.NoError(t, err)
	kept := s.blobPath(t, resp.GetAttachment().GetId())

	// Files left by a process that stopped: a temporary file of an upload,
	// and the files of uploads renamed into place whose row was never
	// committed, in the naming of this version and of the first.
	old := time.Now().Add(-24 * time.Hour)
	plant := func(name string, modTime time.Time) string {
		path := filepath.Join(s.blobDir, name)
		require.NoError(t, os.WriteFile(path, []byte("left over"), 0o600))
		require.NoError(t, os.Chtimes(path, modTime, modTime))
		return path
	}
	staleTemp := plant("upload-123.tmp", old)
	staleBlob := plant("att_0123456789abcdef0123456789abcdef.0123456789abcdef", old)
	staleLegacyBlob := plant("att_fedcba9876543210fedcba9876543210", old)
	// Files of uploads that may still be in progress in another process.
	recentTemp := plant("upload-456.tmp", time.Now())
	recentBlob := plant("att_00000000000000000000000000000000.0000000000000000", time.Now())
	require.NoError(t, os.Chtimes(kept, old, old))

	s.startWorkspace(s.meteringAddr, stackOptions{})
	require.True(t, waitFor(stopTimeout, func() bool { return strings.Count(s.logs.String(), "blob directory swept") == 2 }),
		"the restarted server sweeps the blob directory")

	assert.NoFileExists(t, staleTemp)
	assert.NoFileExists(t, staleBlob)
	assert.NoFileExists(t, staleLegacyBlob)
	assert.FileExists(t, recentTemp)
	assert.FileExists(t, recentBlob)
	assert.FileExists(t, kept, "the file of an attachment stays, however old")
}
