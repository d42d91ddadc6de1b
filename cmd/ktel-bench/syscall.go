package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"

	"github.com/cilium/ebpf"

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
		v := probe.Variant{Hook: probe.HookRaw, Programs: []probe.Program{
			{Name: "enter", Tracepoint: "sys_enter"}, {Name: "exit", Tracepoint: "sys_exit"}}}
		progs := map[string]*ebpf.Program{"enter": objs.FloorEnterRaw, "exit": objs.FloorExitRaw}
		if btf {
			v.Hook = probe.HookBTF
			progs = map[string]*ebpf.Program{"enter": objs.FloorEnterBtf, "exit": objs.FloorExitBtf}
		}
		return attachFloor(&objs, v, progs)
	}
}

// schedFloorSetup attaches empty tp_btf programs to the scheduler
// tracepoints runqlat uses.
func schedFloorSetup() (io.Closer, error) {
	var objs floor.FloorObjects
	if err := floor.LoadFloorObjects(&objs, nil); err != nil {
		return nil, fmt.Errorf("load floor: %w", err)
	}
	v := probe.Variant{Hook: probe.HookBTF, Programs: []probe.Program{
		{Name: "wakeup"}, {Name: "wakeup_new"}, {Name: "switch"}}}
	return attachFloor(&objs, v, map[string]*ebpf.Program{
		"wakeup": objs.FloorWakeupBtf, "wakeup_new": objs.FloorWakeupNewBtf, "switch": objs.FloorSwitchBtf})
}

func attachFloor(objs *floor.FloorObjects, v probe.Variant, progs map[string]*ebpf.Program) (io.Closer, error) {
	links, err := v.Attach(progs)
	if err != nil {
		objs.Close()
		return nil, err
	}
	cs := closers{}
	for _, l := range links {
		cs = append(cs, l)
	}
	return append(cs, objs), nil
}
