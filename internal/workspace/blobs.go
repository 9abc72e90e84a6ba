package workspace

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// tempPattern names the temporary files of uploads in progress in the blob
// directory.
const tempPattern = "upload-*.tmp"

// blobStore keeps the bytes of attachments as files in one directory, each
// named after its attachment id. Ids contain only a prefix and hex digits,
// so a name never leaves the directory.
type blobStore struct {
	dir string
}

// createTemp creates a temporary file for an upload in the blob directory,
// on the same file system as the final files, so place is an atomic rename.
func (b blobStore) createTemp() (*os.File, error) {
	f, err := os.CreateTemp(b.dir, tempPattern)
	if err != nil {
		return nil, fmt.Errorf("create temporary upload file: %w", err)
	}

	return f, nil
}

// path returns the file of the attachment id.
func (b blobStore) path(id string) string {
	return filepath.Join(b.dir, id)
}

// place renames the complete temporary file to the file of the attachment
// id.
func (b blobStore) place(tempPath, id string) error {
	if err := os.Rename(tempPath, b.path(id)); err != nil {
		return fmt.Errorf("store attachment %s: %w", id, err)
	}

	return nil
}

// remove deletes the file at path. A file that does not exist is not an
// error.
func remove(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", path, err)
	}

	return nil
}
