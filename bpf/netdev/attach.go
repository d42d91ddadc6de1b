package netdev

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The cls_bpf filters of the clsact fallback sit at this priority (tc
// "pref") and handle, named filterName. Filters with a lower priority run
// first: one that ends processing (drop, redirect) hides the packet from
// this probe. Another filter at this priority is never touched: the
// interface is then not attached. A filter of ours found there (left by a
// process killed with SIGKILL) is replaced, and removed when found while
// attaching with tcx.
const (
	clsactPriority = 0x6b74 // "kt"
	clsactHandle   = 0x6b74
	filterName     = "ktel-netdev"
)

func progName(ingress, l2 bool) string {
	switch {
	case ingress && l2:
		return netdevProgNetdevTcIngress
	case ingress:
		return netdevProgNetdevTcIngressL3
	case l2:
		return netdevProgNetdevTcEgress
	}
	return netdevProgNetdevTcEgressL3
}

// attachTC attaches one direction with tcx, or with a cls_bpf filter when
// the kernel has no tcx (or TCClsact forces it).
func (w *watcher) attachTC(a *attachment, ingress, l2 bool) error {
	prog := w.progs[progName(ingress, l2)]
	if w.tcx {
		at := ebpf.AttachTCXEgress
		if ingress {
			at = ebpf.AttachTCXIngress
		}
		// First in the chain, so that a later program's verdict (drop,
		// redirect) does not hide packets; ours always passes to the next.
		l, err := link.AttachTCX(link.TCXOptions{Interface: a.index, Program: prog, Attach: at, Anchor: link.Head()})
		if err == nil {
			a.links = append(a.links, l)
			a.setHook(ingress, "tcx")
			return nil
		}
		if !errors.Is(err, ebpf.ErrNotSupported) || w.tc == TCX {
			return fmt.Errorf("attach tcx: %w", err)
		}
		w.log.Info("tcx not supported by this kernel: using clsact qdiscs", "err", err)
		w.tcx = false
	}
	return w.attachClsact(a, ingress, prog)
}

func (a *attachment) setHook(ingress bool, hook string) {
	if ingress {
		a.ingress = hook
	} else {
		a.egress = hook
	}
}

func (w *watcher) attachXDP(a *attachment) error {
	l, err := link.AttachXDP(link.XDPOptions{Program: w.progs[netdevProgNetdevXdpIngress], Interface: a.index})
	if err != nil {
		return err
	}
	a.links = append(a.links, l)
	a.ingress = "xdp"
	return nil
}

// byIndex stands for a link in calls that only read its index.
func byIndex(idx int) netlink.Link {
	return &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: idx}}
}

func ourFilter(idx int, parent uint32, fd int) *netlink.BpfFilter {
	return &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: idx,
			Parent:    parent,
			Handle:    clsactHandle,
			Priority:  clsactPriority,
			Protocol:  unix.ETH_P_ALL,
		},
		Fd:           fd,
		Name:         filterName,
		DirectAction: true,
	}
}

func isOurs(f netlink.Filter) bool {
	b, ok := f.(*netlink.BpfFilter)
	return ok && b.Handle == clsactHandle && strings.HasPrefix(b.Name, filterName)
}

// attachClsact adds a direct-action cls_bpf filter, creating the clsact
// qdisc if there is none.
func (w *watcher) attachClsact(a *attachment, ingress bool, prog *ebpf.Program) error {
	if len(a.clsactFilters) == 0 {
		created, err := w.ensureClsact(a.index)
		if err != nil {
			return err
		}
		a.createdQdisc = created
	}
	parent := uint32(netlink.HANDLE_MIN_EGRESS)
	if ingress {
		parent = netlink.HANDLE_MIN_INGRESS
	}
	filters, err := w.h.FilterList(byIndex(a.index), parent)
	if err != nil {
		return fmt.Errorf("list filters: %w", err)
	}
	for _, f := range filters {
		if f.Attrs().Priority == clsactPriority && !isOurs(f) {
			return fmt.Errorf("another filter holds tc priority %d", clsactPriority)
		}
	}
	// Replace rather than add: a filter of ours there is stale.
	if err := w.h.FilterReplace(ourFilter(a.index, parent, prog.FD())); err != nil {
		return fmt.Errorf("add cls_bpf filter: %w", err)
	}
	a.clsactFilters = append(a.clsactFilters, parent)
	a.setHook(ingress, "clsact")
	return nil
}

// ensureClsact makes sure the interface has a clsact qdisc and reports
// whether it created it.
func (w *watcher) ensureClsact(idx int) (bool, error) {
	qs, err := w.h.QdiscList(byIndex(idx))
	if err != nil {
		return false, fmt.Errorf("list qdiscs: %w", err)
	}
	for _, q := range qs {
		if q.Attrs().Parent == netlink.HANDLE_CLSACT {
			if q.Type() != "clsact" {
				return false, fmt.Errorf("the device has a %s qdisc where clsact goes", q.Type())
			}
			return false, nil
		}
	}
	err = w.h.QdiscAdd(&netlink.Clsact{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: idx,
		Handle:    netlink.MakeHandle(0xffff, 0),
		Parent:    netlink.HANDLE_CLSACT,
	}})
	switch {
	case errors.Is(err, unix.EEXIST): // added concurrently by someone else
		return false, nil
	case err != nil:
		return false, fmt.Errorf("add clsact qdisc: %w", err)
	}
	return true, nil
}

// detachClsact deletes our filters and, if we created the clsact qdisc
// and nobody else added a filter to it since, the qdisc.
func (w *watcher) detachClsact(a *attachment) error {
	if len(a.clsactFilters) == 0 && !a.createdQdisc {
		return nil
	}
	var errs []error
	for _, parent := range a.clsactFilters {
		if err := w.h.FilterDel(ourFilter(a.index, parent, -1)); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete cls_bpf filter: %w", err))
		}
	}
	a.clsactFilters = nil
	if a.createdQdisc {
		a.createdQdisc = false
		empty := true
		for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
			fs, err := w.h.FilterList(byIndex(a.index), parent)
			empty = empty && err == nil && len(fs) == 0
		}
		if empty {
			err := w.h.QdiscDel(&netlink.Clsact{QdiscAttrs: netlink.QdiscAttrs{
				LinkIndex: a.index,
				Handle:    netlink.MakeHandle(0xffff, 0),
				Parent:    netlink.HANDLE_CLSACT,
			}})
			if err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
				errs = append(errs, fmt.Errorf("delete clsact qdisc: %w", err))
			}
		}
	}
	return errors.Join(errs...)
}

// removeStaleFilters deletes filters of ours left on the interface by a
// process that was killed (SIGKILL) in clsact mode, so that packets are
// not counted twice or into orphaned maps. It never touches others'
// filters, nor the qdisc.
func (w *watcher) removeStaleFilters(idx int) {
	qs, err := w.h.QdiscList(byIndex(idx))
	if err != nil {
		return
	}
	has := false
	for _, q := range qs {
		has = has || q.Type() == "clsact"
	}
	if !has {
		return
	}
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		fs, err := w.h.FilterList(byIndex(idx), parent)
		if err != nil {
			continue
		}
		for _, f := range fs {
			if f.Attrs().Priority == clsactPriority && isOurs(f) {
				if err := w.h.FilterDel(ourFilter(idx, parent, -1)); err == nil {
					w.log.Info("removed a stale filter of an earlier run", "ifindex", idx)
				}
			}
		}
	}
}
