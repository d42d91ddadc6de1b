package netdev

import (
	"errors"
	"fmt"
	"io"
	"runtime"
	"slices"
	"sync/atomic"
	"time"

	"github.com/ktel-dev/ktel/internal/nlink"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// watcher owns the attachments. It runs on one OS thread, in the probe's
// network namespace, and is the only one to touch them.
type watcher struct {
	*Probe
	h        *netlink.Handle
	attached map[int]*attachment
	// waiting are matching interfaces refused for want of a slot, by
	// ifindex; they are attached when a slot frees.
	waiting map[int]netlink.Link
	// free are the free slots (of 1..slots), the longest free first: a
	// slot goes to a new interface as late as possible after its last one
	// left, so that what a program still running then counted into it is
	// long done when the slot is zeroed for the next.
	free []uint32
	tcx  bool // tcx not yet found missing
	// failed counts the interfaces that could not be attached, and first
	// is the first such error: Load fails when every matching interface
	// present at start failed.
	failed int
	first  error
}

// attachment is what the probe attached to one interface.
type attachment struct {
	name           string
	index          int
	slot           uint32 // 0 until it has one
	ingress        string // hook used: "tcx", "clsact" or "xdp"
	egress         string
	links          []io.Closer // tcx and XDP links
	createdQdisc   bool        // the clsact qdisc is ours
	clsactFilters  []uint32    // parents (ingress, egress) holding our cls_bpf filter
	clsactProgName string
}

// watch subscribes to link updates, lists the links present, attaches to
// the matching ones, reports on ready, then follows updates until stop.
// It detaches everything before it returns.
func (p *Probe) watch(ready chan<- error) {
	defer close(p.done)
	// Locked for good: tcx and XDP links resolve the ifindex in the
	// calling thread's namespace. A thread that entered another namespace
	// is discarded by Go when this goroutine ends, never reused.
	runtime.LockOSThread()
	if p.nsFD >= 0 {
		if err := unix.Setns(p.nsFD, unix.CLONE_NEWNET); err != nil {
			ready <- fmt.Errorf("enter network namespace: %w", err)
			return
		}
	}
	// Netlink sockets belong to the namespace of the thread that opens them.
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		ready <- fmt.Errorf("netlink: %w", err)
		return
	}
	defer h.Close()
	w := &watcher{Probe: p, h: h, attached: map[int]*attachment{}, waiting: map[int]netlink.Link{}, tcx: p.tc != TCClsact}
	for s := range p.slots {
		w.free = append(w.free, uint32(s)+1)
	}
	defer w.detachAll()

	// Subscribe first, then list: a link that appears in between is in
	// the list, in the updates, or both, and handling it twice is harmless.
	updates, cancel, err := w.subscribe()
	if err != nil {
		ready <- err
		return
	}
	if err := w.resync(); err != nil {
		cancel()
		ready <- err
		return
	}
	if len(w.attached) == 0 && w.failed > 0 {
		// Asked to count interfaces and counting none, for a reason that
		// will most likely hold for those that appear later (tcx forced on
		// a kernel before 6.6): this probe is not working, and says so.
		cancel()
		ready <- fmt.Errorf("%w of %d matching interfaces; the first: %w", ErrNothingAttached, w.failed, w.first)
		return
	}
	if len(w.attached) == 0 {
		p.log.Info("no interface matches yet; waiting for one to appear", "interfaces", p.patterns)
	}
	ready <- nil

	backoff := 100 * time.Millisecond
	for {
		select {
		case <-p.stop:
			cancel()
			return
		case u, ok := <-updates:
			if ok {
				w.update(u)
				continue
			}
		}
		// The subscription ended: its socket overflowed (ENOBUFS) or
		// failed. Subscribe anew, then list again to catch up.
		cancel()
		for {
			select {
			case <-p.stop:
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 10*time.Second)
			if updates, cancel, err = w.subscribe(); err != nil {
				p.log.Warn("resubscribe to link updates", "err", err)
				continue
			}
			if err := w.resync(); err != nil {
				p.log.Warn("list links", "err", err)
			}
			backoff = 100 * time.Millisecond
			break
		}
	}
}

// subscribe returns the channel of link updates and what ends them.
func (w *watcher) subscribe() (<-chan netlink.LinkUpdate, func(), error) {
	ch := make(chan netlink.LinkUpdate, 256)
	done := make(chan struct{})
	var stopping atomic.Bool
	err := netlink.LinkSubscribeWithOptions(ch, done, netlink.LinkSubscribeOptions{
		ErrorCallback: func(err error) {
			if !stopping.Load() {
				w.log.Warn("link updates", "err", err)
			}
		},
	})
	if err != nil {
		close(done)
		return nil, nil, fmt.Errorf("subscribe to link updates: %w", err)
	}
	cancel := func() {
		stopping.Store(true)
		close(done)
		// The receiver closes ch when its socket is closed; drain ch so
		// that it is never stuck sending.
		for range ch {
		}
	}
	return ch, cancel, nil
}

// resync lists the links and brings the attachments in line with them.
func (w *watcher) resync() error {
	links, err := nlink.LinkList(w.h)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return fmt.Errorf("list links: %w", err)
	}
	// An interrupted dump may lack links that exist: only a complete one
	// proves an interface gone. Removals go first, so that their slots
	// serve the links the dump adds.
	complete := err == nil
	present := map[int]bool{}
	for _, l := range links {
		present[l.Attrs().Index] = true
	}
	if complete {
		for idx, a := range w.attached {
			if !present[idx] {
				w.detach(a, true)
			}
		}
		for idx := range w.waiting {
			if !present[idx] {
				delete(w.waiting, idx)
			}
		}
	} else {
		w.log.Warn("link list still interrupted after retries; removed interfaces are forgotten at their next event or list")
	}
	for _, l := range links {
		w.consider(l)
	}
	w.fillFreedSlots()
	return nil
}

func (w *watcher) update(u netlink.LinkUpdate) {
	if u.Header.Type != unix.RTM_DELLINK {
		w.consider(u.Link)
		return
	}
	// A port leaving a bridge also sends RTM_DELLINK, for AF_BRIDGE: the
	// device itself remains.
	if u.IfInfomsg.Family == unix.AF_BRIDGE {
		return
	}
	idx := u.Link.Attrs().Index
	delete(w.waiting, idx)
	if a := w.attached[idx]; a != nil {
		w.detach(a, true)
		w.log.Debug("interface removed", "interface", a.name)
		w.fillFreedSlots()
	}
}

// consider attaches to l if it matches and is not attached, detaches from
// it if it is attached but no longer matches (renamed), and follows
// renames.
func (w *watcher) consider(l netlink.Link) {
	attrs := l.Attrs()
	match := Match(w.patterns, attrs.Name)
	if a := w.attached[attrs.Index]; a != nil {
		switch {
		case !match:
			w.log.Debug("interface renamed and no longer matches", "interface", attrs.Name, "was", a.name)
			w.detach(a, false)
			w.fillFreedSlots()
		case a.name != attrs.Name:
			a.name = attrs.Name
			w.publish(a)
		}
		return
	}
	if !match {
		delete(w.waiting, attrs.Index)
		return
	}
	if len(w.attached) >= w.slots {
		if _, ok := w.waiting[attrs.Index]; !ok {
			w.overflow.Add(1)
			w.log.Warn("interface not attached: every interface slot is in use; it will be when one frees",
				"interface", attrs.Name, "slots", w.slots)
		}
		w.waiting[attrs.Index] = l
		return
	}
	delete(w.waiting, attrs.Index)
	if err := w.attach(l); err != nil {
		w.notAttached(attrs.Name, err)
	}
}

func (w *watcher) notAttached(name string, err error) {
	w.log.Warn("interface not attached", "interface", name, "err", err)
	if w.failed++; w.first == nil {
		w.first = fmt.Errorf("%s: %w", name, err)
	}
}

// fillFreedSlots attaches waiting interfaces while slots are free, lowest
// ifindex (oldest) first.
func (w *watcher) fillFreedSlots() {
	for len(w.attached) < w.slots && len(w.waiting) > 0 {
		idx := slices.Min(mapKeys(w.waiting))
		l := w.waiting[idx]
		delete(w.waiting, idx)
		if err := w.attach(l); err != nil {
			w.notAttached(l.Attrs().Name, err)
		}
	}
}

func mapKeys[V any](m map[int]V) []int {
	out := make([]int, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

// attach gives l a slot and attaches the programs; on error it undoes
// what it did.
func (w *watcher) attach(l netlink.Link) error {
	attrs := l.Attrs()
	a := &attachment{name: attrs.Name, index: attrs.Index}
	// Ethernet framing (loopback has it too); others carry no link-layer
	// header at TC.
	l2 := attrs.EncapType == "ether" || attrs.EncapType == "loopback"
	// The slot first, zeroed, so that the programs never miss it.
	if len(w.free) == 0 { // consider and fillFreedSlots checked
		return errors.New("no free slot")
	}
	if err := w.setSlot(a.index, w.free[0]); err != nil {
		return err
	}
	a.slot, w.free = w.free[0], w.free[1:]
	w.publish(a)
	w.attached[a.index] = a

	w.removeStaleFilters(a.index)
	err := func() error {
		if w.hook == HookXDP && l2 {
			if err := w.attachXDP(a); err != nil {
				// Another XDP program, or a device XDP cannot run on:
				// count ingress at TC instead.
				w.log.Warn("XDP not attached; counting ingress at TC", "interface", a.name, "err", err)
			}
		}
		if a.ingress == "" {
			if err := w.attachTC(a, true, l2); err != nil {
				return err
			}
		}
		return w.attachTC(a, false, l2)
	}()
	if err != nil {
		w.detach(a, false)
		return err
	}
	w.publish(a)
	w.log.Debug("interface attached", "interface", a.name, "ingress", a.ingress, "egress", a.egress)
	return nil
}

// publish makes a's name, hooks and slot visible to Snapshot.
func (w *watcher) publish(a *attachment) {
	w.mu.Lock()
	w.names[a.index] = ifaceInfo{name: a.name, ingress: a.ingress, egress: a.egress, slot: a.slot}
	w.mu.Unlock()
	w.changed()
}

// detach removes what attach made. gone says the device no longer exists
// in this namespace: the kernel removed its qdiscs and filters with it.
func (w *watcher) detach(a *attachment, gone bool) {
	var errs []error
	for _, l := range a.links {
		errs = append(errs, l.Close())
	}
	a.links = nil
	if !gone {
		errs = append(errs, w.detachClsact(a))
	}
	delete(w.attached, a.index)
	w.mu.Lock()
	delete(w.names, a.index)
	w.mu.Unlock()
	w.changed()
	// A program still running may count into the slot after this: see
	// free.
	if err := w.clearSlot(a.index); err != nil {
		errs = append(errs, err)
	}
	w.free = append(w.free, a.slot)
	a.slot = 0
	if err := errors.Join(errs...); err != nil && !gone {
		w.log.Warn("detach", "interface", a.name, "err", err)
	}
}

func (w *watcher) detachAll() {
	for _, a := range w.attached {
		w.detach(a, false)
	}
}
