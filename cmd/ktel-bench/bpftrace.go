package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// bpftrace scripts doing what ktel's probes do, the way one would write
// them by hand: a per-thread start in a hash, a per-key log2 histogram.
const (
	bpftraceSyscall = `tracepoint:raw_syscalls:sys_enter { @start[tid] = nsecs; }
tracepoint:raw_syscalls:sys_exit /@start[tid]/ { @lat[args->id] = hist(nsecs - @start[tid]); delete(@start[tid]); }
END { clear(@start); clear(@lat); }`

	// The hooks alone: what bpftrace pays before doing anything.
	bpftraceSyscallEmpty = `tracepoint:raw_syscalls:sys_enter { } tracepoint:raw_syscalls:sys_exit { }`

	// runqlat.bt from bpftrace's tools, with the field names of
	// /sys/kernel/tracing/events/sched/*/format (TASK_RUNNING is 0).
	bpftraceRunqlat = `tracepoint:sched:sched_wakeup, tracepoint:sched:sched_wakeup_new { @qtime[args->pid] = nsecs; }
tracepoint:sched:sched_switch {
  if (args->prev_state == 0) { @qtime[args->prev_pid] = nsecs; }
  $ns = @qtime[args->next_pid];
  if ($ns) { @usecs = hist(nsecs - $ns); }
  delete(@qtime[args->next_pid]);
}
END { clear(@qtime); clear(@usecs); }`
)

// findBpftrace returns bpftrace's path, installing Debian's package when
// it is missing.
func findBpftrace() (string, error) {
	if p, err := exec.LookPath("bpftrace"); err == nil {
		return p, nil
	}
	fmt.Fprintln(os.Stderr, "bpftrace missing: apt-get install -y bpftrace")
	cmd := exec.Command("apt-get", "install", "-y", "-o", "DPkg::Lock::Timeout=300", "bpftrace")
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("apt-get install bpftrace: %w: %s", err, lastLines(string(out), 3))
	}
	return exec.LookPath("bpftrace")
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(l[max(0, len(l)-n):], "\n")
}

// bpftraceSetup starts bpftrace on script, on every CPU but the measuring
// one when there is another (its compiler must not compete with the
// measurement; its programs run wherever the events are), and returns once
// it has attached.
func bpftraceSetup(path, script string, cpu int) setup {
	if path == "" {
		return func() (io.Closer, error) { return nil, errors.New("bpftrace unavailable") }
	}
	return func() (io.Closer, error) {
		cmd := exec.Command(path, "-e", script)
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			return nil, err
		}
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			return nil, fmt.Errorf("start bpftrace: %w", err)
		}
		setAffinityAllBut(cmd.Process.Pid, cpu)
		attached := make(chan bool, 1)
		go func() {
			sc := bufio.NewScanner(stdout)
			ok := false
			for sc.Scan() {
				if !ok && strings.HasPrefix(sc.Text(), "Attaching ") {
					ok = true
					attached <- true
				}
			}
			if !ok {
				attached <- false
			}
		}()
		bp := &bpftraceProc{cmd: cmd}
		select {
		case ok := <-attached:
			if !ok {
				bp.Close()
				return nil, fmt.Errorf("bpftrace exited before attaching: %s", lastLines(stderr.String(), 3))
			}
		case <-time.After(60 * time.Second):
			bp.Close()
			return nil, errors.New("bpftrace did not attach within 60 s")
		}
		// "Attaching N probes..." comes before the attachments themselves.
		time.Sleep(time.Second)
		return bp, nil
	}
}

type bpftraceProc struct{ cmd *exec.Cmd }

// Close stops bpftrace with SIGINT, as a user would, and kills it if it
// has not exited within 10 s.
func (b *bpftraceProc) Close() error {
	b.cmd.Process.Signal(os.Interrupt)
	done := make(chan error, 1)
	go func() { done <- b.cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		b.cmd.Process.Kill()
		return <-done
	}
}

// setAffinityAllBut keeps pid (bpftrace, then its threads as they inherit
// it) off cpu when another CPU exists.
func setAffinityAllBut(pid, cpu int) {
	var set unix.CPUSet
	for c := range runtime.NumCPU() {
		if c != cpu {
			set.Set(c)
		}
	}
	if set.Count() > 0 {
		unix.SchedSetaffinity(pid, &set)
	}
}
