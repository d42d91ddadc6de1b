package deploy

import (
	"bufio"
	"bytes"
	"debug/elf"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
)

// root is the repository, from this package's directory.
const root = "../.."

// testVersion is stamped into the binary and must come back from --version.
const testVersion = "v0.0.0-deploy-test"

func TestMain(m *testing.M) {
	code := m.Run()
	if built.dir != "" {
		os.RemoveAll(built.dir)
	}
	os.Exit(code)
}

var built struct {
	once sync.Once
	dir  string
	path string
	err  error
}

// dockerBuildCommand returns the shell command of the Dockerfile's RUN
// instruction that runs `go build`, without its --mount flags, and the
// Dockerfile's ARG defaults.
func dockerBuildCommand() (cmd string, args map[string]string, err error) {
	data, err := os.ReadFile(filepath.Join(root, "Dockerfile"))
	if err != nil {
		return "", nil, err
	}
	args = map[string]string{}
	var instrs []string
	var cur strings.Builder
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := sc.Text()
		if t := strings.TrimSpace(line); cur.Len() == 0 && (t == "" || strings.HasPrefix(t, "#")) {
			continue
		}
		if s, ok := strings.CutSuffix(line, "\\"); ok {
			cur.WriteString(s + " ")
			continue
		}
		cur.WriteString(line)
		instrs = append(instrs, strings.TrimSpace(cur.String()))
		cur.Reset()
	}
	argRE := regexp.MustCompile(`^ARG\s+([A-Za-z_][A-Za-z0-9_]*)=(\S*)$`)
	mountRE := regexp.MustCompile(`--mount=\S+\s*`)
	for _, in := range instrs {
		if m := argRE.FindStringSubmatch(in); m != nil {
			args[m[1]] = m[2]
		}
		if rest, ok := strings.CutPrefix(in, "RUN "); ok && strings.Contains(rest, "go build") {
			if cmd != "" {
				return "", nil, fmt.Errorf("Dockerfile: more than one RUN with go build")
			}
			cmd = strings.TrimSpace(mountRE.ReplaceAllString(rest, ""))
		}
	}
	if cmd == "" {
		return "", nil, fmt.Errorf("Dockerfile: no RUN instruction with go build")
	}
	return cmd, args, nil
}

// contextCopy copies the repository into dir as `docker build .` would send
// it: without what .dockerignore excludes (its patterns are top-level names
// and **/name).
func contextCopy(dir string) error {
	data, err := os.ReadFile(filepath.Join(root, ".dockerignore"))
	if err != nil {
		return err
	}
	var top, anywhere []string
	for _, l := range strings.Split(string(data), "\n") {
		l = strings.TrimSpace(l)
		switch {
		case l == "" || strings.HasPrefix(l, "#"):
		case strings.HasPrefix(l, "**/"):
			anywhere = append(anywhere, strings.TrimPrefix(l, "**/"))
		case strings.ContainsAny(l, "/!"):
			return fmt.Errorf(".dockerignore: pattern %q: the test understands only top-level names and **/name", l)
		default:
			top = append(top, l)
		}
	}
	match := func(patterns []string, name string) bool {
		for _, p := range patterns {
			if ok, _ := filepath.Match(p, name); ok {
				return true
			}
		}
		return false
	}
	src, _ := filepath.Abs(root)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		if rel == "." {
			return nil
		}
		if (!strings.Contains(rel, string(filepath.Separator)) && match(top, rel)) || match(anywhere, d.Name()) {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		dst := filepath.Join(dir, rel)
		switch {
		case d.IsDir():
			return os.MkdirAll(dst, 0o755)
		case d.Type().IsRegular():
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			return os.WriteFile(dst, b, 0o644)
		}
		return nil
	})
}

// binary builds ktel as the Dockerfile does, from a copy of the build
// context, once, and returns its path.
func binary(t *testing.T) string {
	t.Helper()
	built.once.Do(func() {
		built.err = func() error {
			cmd, args, err := dockerBuildCommand()
			if err != nil {
				return err
			}
			if !strings.Contains(cmd, "-o /out/ktel") {
				return fmt.Errorf("Dockerfile build command %q does not write /out/ktel", cmd)
			}
			built.dir, err = os.MkdirTemp("", "ktel-deploy-")
			if err != nil {
				return err
			}
			// Readable by the non-root users of TestCapabilities.
			if err := os.Chmod(built.dir, 0o755); err != nil {
				return err
			}
			src := filepath.Join(built.dir, "src")
			if err := contextCopy(src); err != nil {
				return fmt.Errorf("copy build context: %w", err)
			}
			built.path = filepath.Join(built.dir, "ktel")
			cmd = strings.Replace(cmd, "-o /out/ktel", "-o "+built.path, 1)
			sh := exec.Command("sh", "-c", cmd)
			sh.Dir = src
			sh.Env = os.Environ()
			for k, v := range args {
				sh.Env = append(sh.Env, k+"="+v)
			}
			sh.Env = append(sh.Env, "VERSION="+testVersion, "REVISION=deploytest")
			if out, err := sh.CombinedOutput(); err != nil {
				return fmt.Errorf("%s: %w\n%s", cmd, err, out)
			}
			return nil
		}()
	})
	if built.err != nil {
		t.Fatal(built.err)
	}
	return built.path
}

// TestDockerfileBinary builds ktel with the Dockerfile's command and checks
// that it is static, so that it runs on a base image without libc, and
// that it runs.
func TestDockerfileBinary(t *testing.T) {
	cmd, _, err := dockerBuildCommand()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(cmd, "CGO_ENABLED=0") {
		t.Errorf("Dockerfile build command %q does not set CGO_ENABLED=0", cmd)
	}
	bin := binary(t)

	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			t.Errorf("program header %v: not a static binary", p.Type)
		}
	}
	if libs, err := f.ImportedLibraries(); err != nil || len(libs) > 0 {
		t.Errorf("imported libraries %v (%v): not a static binary", libs, err)
	}
	if file, err := exec.LookPath("file"); err == nil {
		out, _ := exec.Command(file, "-b", bin).Output()
		t.Logf("file: %s", bytes.TrimSpace(out))
		if !bytes.Contains(out, []byte("statically linked")) {
			t.Errorf("file(1) says %q", out)
		}
	}

	out, err := exec.Command(bin, "--version").CombinedOutput()
	if err != nil {
		t.Fatalf("ktel --version: %v\n%s", err, out)
	}
	if !bytes.Contains(out, []byte(testVersion)) || !bytes.Contains(out, []byte("deploytest")) {
		t.Errorf("ktel --version printed %q, want version %s and revision deploytest from the build args", out, testVersion)
	}
}

// probes lists the probes the built binary has, from `ktel --help`.
func probes(t *testing.T) []string {
	t.Helper()
	out, err := exec.Command(binary(t), "--help").Output()
	if err != nil {
		t.Fatalf("ktel --help: %v", err)
	}
	_, list, ok := strings.Cut(string(out), "\nProbes:\n")
	if !ok {
		t.Fatalf("no Probes: section in ktel --help:\n%s", out)
	}
	var names []string
	for _, l := range strings.Split(list, "\n") {
		if !strings.HasPrefix(l, "  ") {
			break
		}
		if f := strings.Fields(l); len(f) > 0 {
			names = append(names, f[0])
		}
	}
	if len(names) == 0 {
		t.Fatalf("no probes in ktel --help:\n%s", out)
	}
	return names
}

// variables lists the KTEL_* variables of `ktel --help`.
func variables(t *testing.T) map[string]bool {
	t.Helper()
	out, err := exec.Command(binary(t), "--help").Output()
	if err != nil {
		t.Fatalf("ktel --help: %v", err)
	}
	vars := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^(KTEL_[A-Z0-9_]+)\s`).FindAllStringSubmatch(string(out), -1) {
		vars[m[1]] = true
	}
	return vars
}
