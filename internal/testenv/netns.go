package testenv

import (
	"fmt"
	"runtime"

	"golang.org/x/sys/unix"
)

// NetnsPath is where `ip netns add NAME` puts a namespace's file.
func NetnsPath(name string) string { return "/var/run/netns/" + name }

// InNetns runs f on an OS thread that has joined the network namespace
// name (made with `ip netns add`). The thread is never unlocked: when the
// goroutine ends, Go discards it rather than let another goroutine run in
// the namespace. Sockets f creates stay in the namespace and may be used
// from any goroutine afterwards.
func InNetns[T any](name string, f func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		var r result
		defer func() { ch <- r }()
		fd, err := unix.Open(NetnsPath(name), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			r.err = fmt.Errorf("open netns %s: %w", name, err)
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			r.err = fmt.Errorf("setns %s: %w", name, err)
			return
		}
		r.v, r.err = f()
	}()
	r := <-ch
	return r.v, r.err
}
