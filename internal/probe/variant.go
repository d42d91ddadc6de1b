package probe

import (
	"fmt"
	"log/slog"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// Hook is how a variant's programs attach to their tracepoints.
type Hook string

const (
	HookAuto       Hook = "auto"       // HookBTF: the cheapest of its variants that loads
	HookBTF        Hook = "tp_btf"     // BTF-enabled raw tracepoint, 5.5+
	HookRaw        Hook = "raw_tp"     // raw tracepoint, 4.17+
	HookTracepoint Hook = "tracepoint" // classic tracepoint; needs tracefs
)

// Storage is where a variant keeps per-task state; empty for probes that
// keep none.
type Storage string

const (
	StorageTask Storage = "task" // BPF task storage, 5.11+
	StorageHash Storage = "hash" // a bounded hash keyed by thread id
	// StorageCPU is a per-CPU slot for what runs on the CPU, moved into
	// task storage (5.11+) when its task is switched out.
	StorageCPU Storage = "cpu"
	// StorageSchedInfo reads the scheduler's own per-task accounting
	// (CONFIG_SCHED_INFO, 5.14+), with a baseline in task storage.
	StorageSchedInfo Storage = "sched_info"
)

// Program is one program of a variant and the tracepoint it attaches to.
type Program struct {
	Name       string // in the ELF
	Group      string // tracepoint group, for classic tracepoints
	Tracepoint string
}

// Variant is a set of programs that together implement a probe with one
// hook and one kind of storage.
type Variant struct {
	Hook     Hook
	Storage  Storage
	Programs []Program
}

func (v Variant) String() string {
	if v.Storage == "" {
		return string(v.Hook)
	}
	return string(v.Hook) + "+" + string(v.Storage)
}

// Candidates returns forced alone if it is set (tests, benchmarks), and
// otherwise the variants using hook, in their order of preference. HookAuto
// or "" is HookBTF: every kernel ktel supports (5.8+ with BTF) has
// BTF-enabled tracepoints, so the raw_tp and classic-tracepoint variants,
// dearer, run only when a hook forces them.
func Candidates(variants []Variant, hook Hook, forced *Variant) ([]Variant, error) {
	if forced != nil {
		return []Variant{*forced}, nil
	}
	if hook == "" || hook == HookAuto {
		hook = HookBTF
	}
	var out []Variant
	for _, v := range variants {
		if v.Hook == hook {
			out = append(out, v)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no variant with hook %q", hook)
	}
	return out, nil
}

// FirstLoading calls load for each candidate in turn and returns the first
// success. When none loads, the errors are combined (see Combine). A
// preferred variant that failed for a reason other than the kernel's lack
// of support (a verifier refusal, say) is logged as a warning, with the
// verifier's log, even when a later one loads: the fallback may hide a bug.
func FirstLoading[T any](candidates []Variant, log *slog.Logger, load func(Variant) (T, error)) (T, Variant, error) {
	var errs []error
	for _, v := range candidates {
		p, err := load(v)
		if err == nil {
			log.Debug("variant loaded", "variant", v.String())
			return p, v, nil
		}
		if Unsupported(err) {
			log.Debug("variant unsupported", "variant", v.String(), "err", err)
		} else {
			log.Warn("variant failed; trying the next", append([]any{"variant", v.String()}, ErrAttrs(err)...)...)
		}
		errs = append(errs, fmt.Errorf("%s: %w", v, err))
	}
	var zero T
	return zero, Variant{}, Combine(errs)
}

// Attach attaches the variant's programs from progs, in the variant's
// order, and returns the links. On error, links already made are closed.
func (v Variant) Attach(progs map[string]*ebpf.Program) ([]link.Link, error) {
	var links []link.Link
	for _, p := range v.Programs {
		l, err := attach(v.Hook, p, progs[p.Name])
		if err != nil {
			for _, l := range links {
				l.Close()
			}
			return nil, err
		}
		links = append(links, l)
	}
	return links, nil
}

func attach(h Hook, p Program, prog *ebpf.Program) (link.Link, error) {
	if prog == nil {
		return nil, fmt.Errorf("program %s not loaded", p.Name)
	}
	var (
		l   link.Link
		err error
	)
	switch h {
	case HookBTF:
		l, err = link.AttachTracing(link.TracingOptions{Program: prog, AttachType: ebpf.AttachTraceRawTp})
	case HookRaw:
		l, err = link.AttachRawTracepoint(link.RawTracepointOptions{Name: p.Tracepoint, Program: prog})
	case HookTracepoint:
		l, err = link.Tracepoint(p.Group, p.Tracepoint, prog, nil)
	default:
		return nil, fmt.Errorf("unknown hook %q", h)
	}
	if err != nil {
		return nil, fmt.Errorf("attach %s %s: %w", h, p.Tracepoint, err)
	}
	return l, nil
}
