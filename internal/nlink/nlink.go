// Package nlink holds what netdev's interface watcher and podnet's
// interface mapper both ask of rtnetlink.
package nlink

import (
	"errors"

	"github.com/vishvananda/netlink"
)

// LinkList lists the links of h's namespace, retrying a dump that a
// concurrent change interrupted up to three times. Its error may still be
// netlink.ErrDumpInterrupted, with the links of the last, partial dump:
// the caller decides whether a partial list will do.
func LinkList(h *netlink.Handle) ([]netlink.Link, error) {
	var (
		links []netlink.Link
		err   error
	)
	for range 3 {
		if links, err = h.LinkList(); !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	return links, err
}
