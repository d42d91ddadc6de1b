package podnet

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/ktel-dev/ktel/internal/nlink"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Netlink is Net over netlink sockets opened in one network namespace.
type Netlink struct {
	h *netlink.Handle
	// addrs has strict checking on, without which the kernel ignores
	// IFA_TARGET_NETNSID; the handle's other requests are left as they
	// are.
	addrs *nl.SocketHandle
}

// OpenNetlink opens netlink sockets in the network namespace whose file is
// nsPath ("": the caller's). Entering another namespace needs
// CAP_SYS_ADMIN, at open only: the sockets stay in it. PeerAddrs needs
// CAP_NET_ADMIN over the pods' namespaces.
func OpenNetlink(nsPath string) (*Netlink, error) {
	ns := netns.None()
	if nsPath != "" {
		var err error
		if ns, err = netns.GetFromPath(nsPath); err != nil {
			return nil, fmt.Errorf("open network namespace %s: %w", nsPath, err)
		}
		defer ns.Close()
	}
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink: %w", err)
	}
	s, err := nl.GetNetlinkSocketAt(ns, netns.None(), unix.NETLINK_ROUTE)
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("netlink: %w", err)
	}
	n := &Netlink{h: h, addrs: &nl.SocketHandle{Socket: s}}
	// A dump never blocks a resolution for long, and so never the
	// next ones.
	tv := unix.NsecToTimeval(int64(5 * time.Second))
	for _, err := range []error{
		unix.SetsockoptInt(s.GetFd(), unix.SOL_NETLINK, unix.NETLINK_GET_STRICT_CHK, 1),
		s.SetReceiveTimeout(&tv), s.SetSendTimeout(&tv),
		h.SetSocketTimeout(5 * time.Second),
	} {
		if err != nil {
			n.Close()
			return nil, fmt.Errorf("netlink: %w", err)
		}
	}
	return n, nil
}

// Close closes the sockets.
func (n *Netlink) Close() error {
	n.h.Close()
	n.addrs.Close()
	return nil
}

// Links implements Net.
func (n *Netlink) Links() (map[int]Link, error) {
	links, err := nlink.LinkList(n.h)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return nil, err
	}
	out := make(map[int]Link, len(links))
	for _, l := range links {
		a := l.Attrs()
		out[a.Index] = Link{Index: a.Index, Kind: l.Type(), NetNsID: a.NetNsID, Peer: a.ParentIndex}
	}
	return out, nil
}

// RouteDev implements Net.
func (n *Netlink) RouteDev(ip netip.Addr) (int, error) {
	routes, err := n.h.RouteGet(net.IP(ip.AsSlice()))
	if err != nil {
		return 0, err
	}
	if len(routes) == 0 {
		return 0, errors.New("no route")
	}
	return routes[0].LinkIndex, nil
}

// PeerAddrs implements Net: an address dump of interface peer in the
// namespace nsid (IFA_TARGET_NETNSID), both families.
func (n *Netlink) PeerAddrs(nsid, peer int) ([]netip.Addr, error) {
	req := &nl.NetlinkRequest{
		NlMsghdr: unix.NlMsghdr{
			Len:   unix.SizeofNlMsghdr,
			Type:  unix.RTM_GETADDR,
			Flags: unix.NLM_F_REQUEST | unix.NLM_F_DUMP,
		},
		Sockets: map[int]*nl.SocketHandle{unix.NETLINK_ROUTE: n.addrs},
	}
	msg := nl.NewIfAddrmsg(unix.AF_UNSPEC)
	msg.Index = uint32(peer)
	req.AddData(msg)
	id := make([]byte, 4)
	binary.NativeEndian.PutUint32(id, uint32(int32(nsid)))
	req.AddData(nl.NewRtAttr(unix.IFA_TARGET_NETNSID, id))
	msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWADDR)
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, m := range msgs {
		if len(m) < unix.SizeofIfAddrmsg {
			continue
		}
		if h := nl.DeserializeIfAddrmsg(m); int(h.Index) != peer {
			continue
		}
		attrs, err := nl.ParseRouteAttr(m[unix.SizeofIfAddrmsg:])
		if err != nil {
			return nil, fmt.Errorf("parse address: %w", err)
		}
		// IFA_LOCAL is the interface's own address where it differs
		// from IFA_ADDRESS (the far end of a point-to-point link).
		var local, addr netip.Addr
		for _, a := range attrs {
			ip, ok := netip.AddrFromSlice(a.Value)
			switch {
			case !ok:
			case a.Attr.Type == unix.IFA_LOCAL:
				local = ip.Unmap()
			case a.Attr.Type == unix.IFA_ADDRESS:
				addr = ip.Unmap()
			}
		}
		if local.IsValid() {
			addr = local
		}
		if addr.IsValid() && !addr.IsLinkLocalUnicast() { // never a pod's
			out = append(out, addr)
		}
	}
	return out, nil
}
