package localpg

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	// startTimeout bounds how long pg_ctl waits for the server to accept
	// connections, in seconds. Recovery after a crash can take a while.
	startTimeout = 60

	// lockPollInterval is how often a process retries the lock file while
	// another process creates or starts the cluster.
	lockPollInterval = 100 * time.Millisecond

	// commandWaitDelay bounds how long a command may hold its output open
	// after it exits, which guards against a server that inherits the pipe.
	commandWaitDelay = 5 * time.Second
)

// cluster is the private PostgreSQL cluster in one data directory.
type cluster struct {
	dataDir     string
	port        int
	versionsDir string
	getenv      func(string) string
	logger      *slog.Logger

	// initdb and pgCtl are absolute paths, set by findBinaries.
	initdb string
	pgCtl  string

	// owner is the system user that runs initdb and pg_ctl, or nil to run
	// them as the current user. runAs is the runuser or su program.
	owner *user.User
	runAs string
}

// newCluster returns the cluster that opts describes.
func newCluster(opts Options) (*cluster, error) {
	dataDir := opts.Dir
	if dataDir == "" {
		root, err := moduleRoot()
		if err != nil {
			return nil, err
		}
		dataDir = filepath.Join(root, ".data", "postgres")
	}

	dataDir, err := filepath.Abs(dataDir)
	if err != nil {
		return nil, fmt.Errorf("resolve data directory %q: %w", opts.Dir, err)
	}

	c := &cluster{
		dataDir:     dataDir,
		port:        opts.Port,
		versionsDir: opts.VersionsDir,
		getenv:      opts.Getenv,
		logger:      opts.Logger,
	}

	return c, nil
}

// startPrivateCluster returns the URL of the private cluster after it accepts
// connections, creating and starting it when needed.
func startPrivateCluster(ctx context.Context, opts Options) (string, error) {
	clusterURL := privateClusterURL(opts.Port)
	if err := probe(ctx, clusterURL); err == nil {
		opts.Logger.InfoContext(ctx, "using the running private cluster", "url", clusterURL)
		return clusterURL, nil
	}

	c, err := newCluster(opts)
	if err != nil {
		return "", err
	}

	if err := c.findBinaries(); err != nil {
		return "", err
	}

	if err := c.findOwner(); err != nil {
		return "", err
	}

	unlock, err := lockFile(ctx, c.dataDir+".lock")
	if err != nil {
		return "", err
	}
	defer unlock()

	// Another process may have started the cluster while this one waited.
	if err := probe(ctx, clusterURL); err == nil {
		c.logger.InfoContext(ctx, "using the running private cluster", "url", clusterURL)
		return clusterURL, nil
	}

	if err := c.prepareDataDir(ctx); err != nil {
		return "", err
	}

	if !c.initialised() {
		if err := c.initialise(ctx); err != nil {
			return "", err
		}
	}

	if err := c.start(ctx); err != nil {
		return "", err
	}

	if err := probe(ctx, clusterURL); err != nil {
		return "", fmt.Errorf("the private cluster in %s started but rejects connections at %s: %w", c.dataDir, clusterURL, err)
	}
	c.logger.InfoContext(ctx, "private cluster ready", "url", clusterURL, "data_dir", c.dataDir)

	return clusterURL, nil
}

// findOwner sets c.owner to the postgres system user and c.runAs to a program
// that runs commands as that user, when the process runs as root. Otherwise it
// leaves both empty, so that commands run as the current user.
func (c *cluster) findOwner() error {
	if os.Geteuid() != 0 {
		return nil
	}

	owner, err := user.Lookup("postgres")
	if err != nil {
		var unknown user.UnknownUserError
		if errors.As(err, &unknown) {
			return errors.New("the process runs as root, which PostgreSQL rejects, and there is no postgres system user " +
				"to run initdb and pg_ctl as: create one (useradd --system postgres) or set DATABASE_URL")
		}

		return fmt.Errorf("look up the postgres system user: %w", err)
	}

	for _, name := range []string{"runuser", "su"} {
		if path, ok := c.lookPath(name, "/usr/sbin", "/sbin", "/usr/bin", "/bin"); ok {
			c.owner = owner
			c.runAs = path
			return nil
		}
	}

	return errors.New("the process runs as root, which PostgreSQL rejects, and neither runuser nor su was found " +
		"to run initdb and pg_ctl as the postgres user: install util-linux or set DATABASE_URL")
}

// findBinaries sets c.initdb and c.pgCtl, taking them from PATH when initdb is
// there, and otherwise from the newest version in c.versionsDir.
func (c *cluster) findBinaries() error {
	if initdb, ok := c.lookPath("initdb"); ok {
		pgCtl := filepath.Join(filepath.Dir(initdb), "pg_ctl")
		if !isExecutable(pgCtl) {
			pgCtl, ok = c.lookPath("pg_ctl")
			if !ok {
				return fmt.Errorf("initdb was found at %s but pg_ctl was not found next to it or in PATH: install the PostgreSQL server or set DATABASE_URL", initdb)
			}
		}
		c.initdb, c.pgCtl = initdb, pgCtl
		return nil
	}

	versions, err := installedVersions(c.versionsDir)
	if err != nil {
		return err
	}

	for _, version := range versions {
		binDir := filepath.Join(c.versionsDir, version, "bin")
		initdb := filepath.Join(binDir, "initdb")
		pgCtl := filepath.Join(binDir, "pg_ctl")
		if isExecutable(initdb) && isExecutable(pgCtl) {
			c.initdb, c.pgCtl = initdb, pgCtl
			return nil
		}
	}

	return fmt.Errorf("initdb was not found in PATH or %s: install PostgreSQL or set DATABASE_URL",
		filepath.Join(c.versionsDir, "*", "bin"))
}

// installedVersions returns the names of the version directories in dir,
// newest first. A missing dir means no versions.
func installedVersions(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list PostgreSQL versions in %s: %w", dir, err)
	}

	var versions []string
	for _, entry := range entries {
		if entry.IsDir() {
			versions = append(versions, entry.Name())
		}
	}
	slices.SortFunc(versions, func(a, b string) int {
		return compareVersions(b, a)
	})

	return versions, nil
}

// compareVersions compares dotted version numbers such as "9.6" and "15" part
// by part as numbers. A part that is not a number sorts before every number.
func compareVersions(a, b string) int {
	partsA := strings.Split(a, ".")
	partsB := strings.Split(b, ".")
	for i := range max(len(partsA), len(partsB)) {
		numberA, numberB := -1, -1
		if i < len(partsA) {
			if n, err := strconv.Atoi(partsA[i]); err == nil {
				numberA = n
			}
		}
		if i < len(partsB) {
			if n, err := strconv.Atoi(partsB[i]); err == nil {
				numberB = n
			}
		}
		if numberA != numberB {
			return numberA - numberB
		}
	}

	return 0
}

// lookPath finds an executable named name in the directories of the PATH that
// c.getenv returns, then in extraDirs.
func (c *cluster) lookPath(name string, extraDirs ...string) (string, bool) {
	dirs := append(filepath.SplitList(c.getenv("PATH")), extraDirs...)
	for _, dir := range dirs {
		if dir == "" || !filepath.IsAbs(dir) {
			continue
		}

		path := filepath.Join(dir, name)
		if isExecutable(path) {
			return path, true
		}
	}

	return "", false
}

// isExecutable reports whether path is a regular file with an execute bit set,
// following symbolic links.
func isExecutable(path string) bool {
	info, err := os.Stat(path)
	if err != nil {
		return false
	}

	return info.Mode().IsRegular() && info.Mode().Perm()&0o111 != 0
}

// prepareDataDir creates the data directory and, when the cluster runs as
// another user, gives that user the directory and checks that it can reach it.
func (c *cluster) prepareDataDir(ctx context.Context) error {
	if err := os.MkdirAll(filepath.Dir(c.dataDir), 0o755); err != nil {
		return fmt.Errorf("create the parent of data directory %s: %w", c.dataDir, err)
	}
	if err := os.Mkdir(c.dataDir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("create data directory %s: %w", c.dataDir, err)
	}

	if c.owner == nil {
		return nil
	}

	if err := c.chownDataDir(ctx); err != nil {
		return err
	}

	// PostgreSQL needs the search (x) permission on every parent directory,
	// which root does not need and so may not have granted.
	if err := c.run(ctx, "test", "-w", c.dataDir, "-a", "-x", c.dataDir); err != nil {
		return fmt.Errorf("user %s cannot write to data directory %s: make every parent directory searchable by it (chmod o+x) or set Options.Dir elsewhere: %w",
			c.owner.Username, c.dataDir, err)
	}

	return nil
}

// chownDataDir gives the data directory and everything in it to c.owner, unless
// the directory already belongs to that user.
func (c *cluster) chownDataDir(ctx context.Context) error {
	uid, err := strconv.Atoi(c.owner.Uid)
	if err != nil {
		return fmt.Errorf("parse uid %q of user %s: %w", c.owner.Uid, c.owner.Username, err)
	}
	gid, err := strconv.Atoi(c.owner.Gid)
	if err != nil {
		return fmt.Errorf("parse gid %q of user %s: %w", c.owner.Gid, c.owner.Username, err)
	}

	info, err := os.Stat(c.dataDir)
	if err != nil {
		return fmt.Errorf("inspect data directory %s: %w", c.dataDir, err)
	}
	if stat, ok := info.Sys().(*syscall.Stat_t); ok && int(stat.Uid) == uid {
		return nil
	}

	c.logger.InfoContext(ctx, "giving the data directory to the postgres user", "data_dir", c.dataDir, "user", c.owner.Username)
	err = filepath.WalkDir(c.dataDir, func(path string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}

		return os.Lchown(path, uid, gid)
	})
	if err != nil {
		return fmt.Errorf("give data directory %s to user %s: %w", c.dataDir, c.owner.Username, err)
	}

	return nil
}

// initialised reports whether initdb has already created the cluster.
func (c *cluster) initialised() bool {
	_, err := os.Stat(filepath.Join(c.dataDir, "PG_VERSION"))
	return err == nil
}

// initialise creates the cluster with initdb: superuser postgres, trust
// authentication, UTF8 encoding and the C locale, so that results do not
// depend on the machine's locale.
func (c *cluster) initialise(ctx context.Context) error {
	c.logger.InfoContext(ctx, "creating the private cluster", "data_dir", c.dataDir, "initdb", c.initdb)

	err := c.run(ctx, c.initdb, "-D", c.dataDir, "-U", clusterUser, "--auth=trust", "--encoding=UTF8", "--no-locale")
	if err != nil {
		return fmt.Errorf("the private cluster in %s could not be created: %w", c.dataDir, err)
	}

	return nil
}

// start starts the server with pg_ctl and waits until it accepts connections.
// The server listens on 127.0.0.1:c.port only, and has no Unix socket because
// the default socket directory may not be writable and a socket in the data
// directory may exceed the 107-byte path limit.
func (c *cluster) start(ctx context.Context) error {
	c.logger.InfoContext(ctx, "starting the private cluster", "data_dir", c.dataDir, "port", c.port)

	logFile := c.logFile()
	serverOptions := fmt.Sprintf("-c listen_addresses=127.0.0.1 -c port=%d -c unix_socket_directories=''", c.port)
	err := c.run(ctx, c.pgCtl, "start", "-D", c.dataDir, "-l", logFile, "-w", "-t", strconv.Itoa(startTimeout), "-o", serverOptions)
	if err != nil {
		return fmt.Errorf("the private cluster in %s did not start: %w\nlast lines of %s:\n%s", c.dataDir, err, logFile, lastLines(logFile, 10))
	}

	return nil
}

// stop stops the server with a fast shutdown. It returns nil when no server
// runs in the data directory.
func (c *cluster) stop(ctx context.Context) error {
	if _, err := os.Stat(filepath.Join(c.dataDir, "postmaster.pid")); errors.Is(err, fs.ErrNotExist) {
		return nil
	}

	if err := c.findBinaries(); err != nil {
		return err
	}

	if err := c.findOwner(); err != nil {
		return err
	}

	c.logger.InfoContext(ctx, "stopping the private cluster", "data_dir", c.dataDir)
	if err := c.run(ctx, c.pgCtl, "stop", "-D", c.dataDir, "-m", "fast", "-w"); err != nil {
		return fmt.Errorf("stop the private cluster in %s: %w", c.dataDir, err)
	}

	return nil
}

// logFile returns the path of the server log, which pg_ctl appends to.
func (c *cluster) logFile() string {
	return filepath.Join(c.dataDir, "postgres.log")
}

// run runs program with args as c.owner, or as the current user when c.owner
// is nil. The error contains the combined output of the program.
func (c *cluster) run(ctx context.Context, program string, args ...string) error {
	var cmd *exec.Cmd
	switch {
	case c.owner == nil:
		cmd = exec.CommandContext(ctx, program, args...)
	case filepath.Base(c.runAs) == "runuser":
		cmd = exec.CommandContext(ctx, c.runAs, append([]string{"-u", c.owner.Username, "--", program}, args...)...)
	default:
		cmd = exec.CommandContext(ctx, c.runAs, "-s", "/bin/sh", "-c", shellJoin(program, args), c.owner.Username)
	}

	// The owner may not be able to enter the working directory of this
	// process, and initdb fails when it cannot.
	cmd.Dir = "/"
	cmd.WaitDelay = commandWaitDelay

	var output bytes.Buffer
	cmd.Stdout = &output
	cmd.Stderr = &output

	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s: %w: %s", filepath.Base(program), err, strings.TrimSpace(output.String()))
	}

	return nil
}

// shellJoin quotes program and args for /bin/sh.
func shellJoin(program string, args []string) string {
	quoted := make([]string, 0, len(args)+1)
	for _, word := range append([]string{program}, args...) {
		quoted = append(quoted, "'"+strings.ReplaceAll(word, "'", `'\''`)+"'")
	}

	return strings.Join(quoted, " ")
}

// lastLines returns up to n of the last lines of the file at path, or a note
// saying why it cannot.
func lastLines(path string, n int) string {
	const maxTail = 4096

	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(log not readable: %v)", err)
	}
	defer f.Close()

	if info, err := f.Stat(); err == nil && info.Size() > maxTail {
		if _, err := f.Seek(-maxTail, io.SeekEnd); err != nil {
			return fmt.Sprintf("(log not readable: %v)", err)
		}
	}

	tail, err := io.ReadAll(f)
	if err != nil {
		return fmt.Sprintf("(log not readable: %v)", err)
	}

	lines := strings.Split(strings.TrimRight(string(tail), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}

	return strings.Join(lines, "\n")
}

// lockFile takes an exclusive lock on the file at path, creating it when
// missing, and returns the function that releases it. It waits while another
// process holds the lock, until ctx ends.
func lockFile(ctx context.Context, path string) (func(), error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create the directory of lock file %s: %w", path, err)
	}

	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open lock file %s: %w", path, err)
	}

	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { _ = f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			_ = f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}

		select {
		case <-ctx.Done():
			_ = f.Close()
			return nil, fmt.Errorf("wait for lock file %s, held by another process starting the cluster: %w", path, ctx.Err())
		case <-time.After(lockPollInterval):
		}
	}
}
