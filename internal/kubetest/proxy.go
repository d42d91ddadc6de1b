package kubetest

import (
	"io"
	"net"
	"sync"
	"testing"
)

// Proxy is a TCP proxy to the API server on a loopback port, which a test
// can cut (every connection is closed and new ones are refused at once) to
// make the API server unreachable for a client without stopping it.
type Proxy struct {
	Addr string // host:port

	mu    sync.Mutex
	up    bool
	conns map[net.Conn]struct{}
	l     net.Listener
	wg    sync.WaitGroup
}

// Proxy starts a proxy to c's API server, up or down, stopped when tb
// ends. Its kubeconfig is (*Cluster).WriteKubeconfig with "https://"+Addr.
func (c *Cluster) Proxy(tb testing.TB, up bool) *Proxy {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	target := c.Server[len("https://"):]
	p := &Proxy{Addr: l.Addr().String(), up: up, conns: map[net.Conn]struct{}{}, l: l}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			p.wg.Add(1)
			go func() {
				defer p.wg.Done()
				p.serve(conn, target)
			}()
		}
	}()
	tb.Cleanup(func() {
		l.Close()
		p.SetUp(false)
		p.wg.Wait()
	})
	return p
}

// SetUp lets connections through (true) or cuts them all (false).
func (p *Proxy) SetUp(up bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.up = up
	if !up {
		for c := range p.conns {
			c.Close()
		}
	}
}

func (p *Proxy) serve(client net.Conn, target string) {
	if !p.track(client) {
		client.Close()
		return
	}
	defer p.untrack(client)
	server, err := net.Dial("tcp", target)
	if err != nil {
		return
	}
	if !p.track(server) {
		server.Close()
		return
	}
	defer p.untrack(server)
	done := make(chan struct{}, 2)
	go func() { io.Copy(server, client); done <- struct{}{} }()
	go func() { io.Copy(client, server); done <- struct{}{} }()
	<-done
}

// track registers an open connection, or reports false when the proxy is
// down.
func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.up {
		return false
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	c.Close()
}
