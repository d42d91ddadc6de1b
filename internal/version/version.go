// Package version carries the build's identity, set by the Makefile with
// -ldflags -X and otherwise read from the Go build information.
package version

import (
	"runtime"
	"runtime/debug"
)

// Set at link time by the Makefile.
var (
	Version  = ""
	Revision = ""
)

// Info is the version, VCS revision and Go version of this binary.
func Info() (version, revision, goVersion string) {
	version, revision = Version, Revision
	if bi, ok := debug.ReadBuildInfo(); ok {
		if version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			version = bi.Main.Version
		}
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && revision == "" {
				revision = s.Value
			}
		}
	}
	if version == "" {
		version = "dev"
	}
	if revision == "" {
		revision = "unknown"
	}
	return version, revision, runtime.Version()
}
