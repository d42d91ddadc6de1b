package syscall

import (
	"runtime"
	"strconv"
)

// Name returns the name of syscall nr on arch (a GOARCH), or its number as
// text when the table has none (a syscall newer than the headers the table
// was generated from).
func Name(arch string, nr uint32) string {
	if t := names[arch]; int(nr) < len(t) && t[nr] != "" {
		return t[nr]
	}
	return strconv.FormatUint(uint64(nr), 10)
}

// NativeName is Name for the architecture ktel runs on. 32-bit compat
// syscalls (ia32 on amd64) carry numbers of another table; they are not
// told apart and are named from the native table.
func NativeName(nr uint32) string { return Name(runtime.GOARCH, nr) }

// Number returns the number of the syscall named name on arch, and whether
// the table has it.
func Number(arch, name string) (uint32, bool) {
	for nr, n := range names[arch] {
		if n != "" && n == name {
			return uint32(nr), true
		}
	}
	return 0, false
}

// NativeNumber is Number for the architecture ktel runs on.
func NativeNumber(name string) (uint32, bool) { return Number(runtime.GOARCH, name) }
