package testenv

import (
	"os/exec"
	"runtime"
	"syscall"
)

// StartTied starts cmd with Pdeathsig SIGKILL, so that it dies with the
// test binary even when cleanup never runs (a panic, go test's timeout),
// and calls exited with cmd.Wait's result once it has exited. Pdeathsig
// fires when the thread that forked exits, not the process, and Go ends
// threads (InNetns ends the ones it moved to a namespace): the fork
// happens on a thread locked to a goroutine that lives until the child
// exits, else an unrelated InNetns could kill the child at any time.
func StartTied(cmd *exec.Cmd, exited func(error)) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		exited(cmd.Wait())
	}()
	return <-started
}
