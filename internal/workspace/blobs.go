package workspace

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// tempPattern names the temporary files of uploads in progress in the blob
// directory.
const tempPattern = "upload-*.tmp"

// sweepBatch is how many attachment ids one query of SweepBlobDir looks up.
const sweepBatch = 1000

// blobStore keeps the bytes of attachments as files in one directory. A file
// is named after its attachment id and the attempt that wrote it (see
// newBlobName). Ids contain only a prefix and hex digits, so a name never
// leaves the directory.
type blobStore struct {
	dir string
}

// newBlobName returns the name of the file of one upload attempt of the
// attachment id: the id, a dot and 64 random bits in hex. Attempts of one
// idempotency key share the id, so each needs a file of its own: one
// attempt's failure then never removes or replaces the file of another.
// Attachments stored before the blob_name column existed have a file named
// after the id alone.
func newBlobName(id string) string {
	var b [8]byte
	// Since Go 1.24, crypto/rand.Read never returns an error.
	_, _ = rand.Read(b[:])

	return id + "." + hex.EncodeToString(b[:])
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

// path returns the path of the blob file name.
func (b blobStore) path(name string) string {
	return filepath.Join(b.dir, name)
}

// place renames the complete temporary file to the blob file name.
func (b blobStore) place(tempPath, name string) error {
	if err := os.Rename(tempPath, b.path(name)); err != nil {
		return fmt.Errorf("store attachment file %s: %w", name, err)
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

// SweepBlobDir removes the files of the blob directory that no attachment
// uses: temporary files of uploads, and attachment files without a row,
// such as the file of an upload whose process stopped between the rename
// and the COMMIT. It removes only files last modified before
// UploadReservationTTL plus the time a background task may spend settling a
// create, so that it leaves alone the files of uploads still in progress in
// this or another process. It logs the number of files removed. On a
// database error it returns the error after removing the temporary files;
// calling it again is safe.
func (s *Service) SweepBlobDir(ctx context.Context) error {
	removed, err := s.sweepBlobDir(ctx)
	if err != nil {
		return err
	}

	s.logger.InfoContext(ctx, "blob directory swept", "dir", s.blobs.dir, "removed_files", removed, "min_age", s.staleBlobAge())

	return nil
}

func (s *Service) sweepBlobDir(ctx context.Context) (int, error) {
	entries, err := os.ReadDir(s.blobs.dir)
	if err != nil {
		return 0, fmt.Errorf("read the blob directory: %w", err)
	}

	cutoff := s.cfg.Now().Add(-s.staleBlobAge())
	var temps []string
	blobsByID := map[string][]string{}
	for _, e := range entries {
		name := e.Name()
		info, err := e.Info()
		if err != nil || !info.Mode().IsRegular() || !info.ModTime().Before(cutoff) {
			// A file removed meanwhile, a directory, or a recent file.
			continue
		}

		if temp, _ := filepath.Match(tempPattern, name); temp {
			temps = append(temps, name)
			continue
		}
		if strings.HasPrefix(name, attachmentPrefix) {
			id, _, _ := strings.Cut(name, ".")
			blobsByID[id] = append(blobsByID[id], name)
		}
	}

	removed := s.removeBlobFiles(ctx, temps)

	ids := make([]string, 0, len(blobsByID))
	for id := range blobsByID {
		ids = append(ids, id)
	}
	for start := 0; start < len(ids); start += sweepBatch {
		batch := ids[start:min(start+sweepBatch, len(ids))]
		used, err := s.usedBlobNames(ctx, batch)
		if err != nil {
			return removed, err
		}

		var unused []string
		for _, id := range batch {
			for _, name := range blobsByID[id] {
				if !used[name] {
					unused = append(unused, name)
				}
			}
		}
		removed += s.removeBlobFiles(ctx, unused)
	}

	return removed, nil
}

// usedBlobNames returns the blob file names of the attachments with the ids.
func (s *Service) usedBlobNames(ctx context.Context, ids []string) (map[string]bool, error) {
	const query = `SELECT coalesce(blob_name, id) FROM workspace.attachments WHERE id = ANY ($1)`

	ctx, cancel := context.WithTimeout(ctx, databaseTimeout)
	defer cancel()

	rows, err := s.pool.Query(ctx, query, ids)
	if err != nil {
		return nil, fmt.Errorf("look up %d attachments: %w", len(ids), translate(err))
	}
	defer rows.Close()

	used := map[string]bool{}
	for rows.Next() {
		var name string
		if err := rows.Scan(&name); err != nil {
			return nil, fmt.Errorf("look up %d attachments: %w", len(ids), translate(err))
		}
		used[name] = true
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("look up %d attachments: %w", len(ids), translate(err))
	}

	return used, nil
}

// removeBlobFiles removes the files with the names and returns how many it
// removed. Failures are logged.
func (s *Service) removeBlobFiles(ctx context.Context, names []string) int {
	removed := 0
	for _, name := range names {
		if err := remove(s.blobs.path(name)); err != nil {
			s.logger.ErrorContext(ctx, "remove unused file of the blob directory failed", "file", name, "error", err)
			continue
		}
		removed++
	}

	return removed
}

// staleBlobAge returns the age after which SweepBlobDir removes an unused
// file.
func (s *Service) staleBlobAge() time.Duration {
	return s.cfg.UploadReservationTTL + settleTimeout
}
