package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/ktel-dev/ktel/bpf/floor"
	"github.com/ktel-dev/ktel/bpf/syscall"
	"github.com/ktel-dev/ktel/internal/probe"
)

// syscallConfigs: no probe, the empty-program floors, and every variant of
// the syscall probe, each compared with the floor of its hook.
func syscallConfigs(log *slog.Logger) []config {
	cfgs := []config{
		{name: "none"},
		{name: "floor tp_btf", setup: floorSetup(true)},
		{name: "floor raw_tp", setup: floorSetup(false)},
	}
	for _, v := range syscall.Variants {
		if v.Hook == probe.HookTracepoint {
			continue // needs tracefs; a fallback, not a candidate
		}
		f := "floor raw_tp"
		if v.Hook == probe.HookBTF {
			f = "floor tp_btf"
		}
		cfgs = append(cfgs, config{
			name:  "syscall " + v.String(),
			floor: f,
			setup: func() (io.Closer, error) {
				return syscall.Load(syscall.Options{Schema: 3, Variant: &v}, log)
			},
		})
	}
	return cfgs
}

type closers []io.Closer

func (cs closers) Close() error {
	var errs []error
	for _, c := range cs {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}

func floorSetup(btf bool) setup {
	return func() (io.Closer, error) {
		var objs floor.FloorObjects
		if err := floor.LoadFloorObjects(&objs, nil); err != nil {
			return nil, fmt.Errorf("load floor: %w", err)
		}
		cs := closers{&objs}
		pairs := []struct {
			tp   string
			prog *ebpf.Program
		}{{"sys_enter", objs.FloorEnterRaw}, {"sys_exit", objs.FloorExitRaw}}
		if btf {
			pairs[0].prog, pairs[1].prog = objs.FloorEnterBtf, objs.FloorExitBtf
		}
		for _, p := range pairs {
			var (
				l   link.Link
				err error
			)
			if btf {
				l, err = link.AttachTracing(link.TracingOptions{Program: p.prog, AttachType: ebpf.AttachTraceRawTp})
			} else {
				l, err = link.AttachRawTracepoint(link.RawTracepointOptions{Name: p.tp, Program: p.prog})
			}
			if err != nil {
				cs.Close()
				return nil, fmt.Errorf("attach floor %s: %w", p.tp, err)
			}
			cs = append(closers{l}, cs...)
		}
		return cs, nil
	}
}
