package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/base32"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// writeKubeRules writes, in iptables-restore format, the nat table that
// kube-proxy's iptables mode builds for n ClusterIP services of endpoints
// endpoints each (chain names hashed as kube-proxy hashes them):
//
//	OUTPUT -> KUBE-SERVICES: one rule per service, -d VIP -p tcp --dport
//	  -> KUBE-SVC-xxx: one rule per endpoint, all but the last with
//	     -m statistic --mode random --probability 1/(remaining)
//	     -> KUBE-SEP-xxx: hairpin mark (-s endpoint -j KUBE-MARK-MASQ),
//	        then DNAT --to-destination endpoint
//
// Services are in order, so a connect to the last one walks past every
// other service's rule in KUBE-SERVICES, as in kube-proxy (which has no
// better order to offer). Left out: KUBE-NODEPORTS, KUBE-POSTROUTING's
// masquerade, and the external-traffic chains, which a ClusterIP connect
// from the node does not reach.
func writeKubeRules(w io.Writer, n, endpoints int) error {
	bw := bufio.NewWriterSize(w, 1<<20)
	svc := make([]string, n)
	sep := make([][]string, n)
	fmt.Fprint(bw, "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n")
	fmt.Fprint(bw, ":KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n")
	for i := range n {
		name := svcName(i) + ":http"
		svc[i] = kubeChain("KUBE-SVC-", name+"tcp")
		fmt.Fprintf(bw, ":%s - [0:0]\n", svc[i])
		for j := range endpoints {
			sep[i] = append(sep[i], kubeChain("KUBE-SEP-", name+"tcp"+backendAddr(j).String()))
			fmt.Fprintf(bw, ":%s - [0:0]\n", sep[i][j])
		}
	}
	fmt.Fprint(bw, "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n")
	fmt.Fprint(bw, "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n")
	for i := range n {
		vip := vipAddr(i)
		fmt.Fprintf(bw, "-A KUBE-SERVICES -d %s/32 -p tcp -m comment --comment \"default/%s:http cluster IP\" -m tcp --dport %d -j %s\n",
			vip.Addr(), svcName(i), vip.Port(), svc[i])
	}
	for i := range n {
		for j := range endpoints {
			be := backendAddr(j)
			fmt.Fprintf(bw, "-A %s -m comment --comment \"default/%s:http -> %s\"", svc[i], svcName(i), be)
			if rest := endpoints - j; rest > 1 {
				fmt.Fprintf(bw, " -m statistic --mode random --probability %0.10f", 1/float64(rest))
			}
			fmt.Fprintf(bw, " -j %s\n", sep[i][j])
		}
		for j := range endpoints {
			be := backendAddr(j)
			fmt.Fprintf(bw, "-A %s -s %s/32 -m comment --comment default/%s:http -j KUBE-MARK-MASQ\n", sep[i][j], be.Addr(), svcName(i))
			fmt.Fprintf(bw, "-A %s -p tcp -m comment --comment default/%s:http -m tcp -j DNAT --to-destination %s\n", sep[i][j], svcName(i), be)
		}
	}
	fmt.Fprint(bw, "COMMIT\n")
	return bw.Flush()
}

const emptyNat = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"

func svcName(i int) string { return fmt.Sprintf("svc-%d", i) }

// kubeChain names a chain as kube-proxy does: a prefix and 16 characters
// of the base32 SHA-256 of what the chain is for.
func kubeChain(prefix, what string) string {
	h := sha256.Sum256([]byte(what))
	return prefix + base32.StdEncoding.EncodeToString(h[:])[:16]
}

// restore runs iptables-<backend>-restore on file in namespace ns and
// returns how long the process took, start to exit (kube-proxy also runs
// the command for every sync, so its start is part of the cost). nsenter
// joins only the network namespace and then execs the command, so
// nothing else is timed. The xtables lock is a private file: the
// legacy backend holds it for the whole restore and must not block, or
// be blocked by, the host's iptables.
func restore(ctx context.Context, backend, ns, file, lockDir string, timeout time.Duration) (time.Duration, error) {
	f, err := os.Open(file)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c := exec.CommandContext(ctx, "nsenter", "--net=/run/netns/"+ns, "iptables-"+backend+"-restore")
	c.Stdin = f
	c.Env = append(os.Environ(), "XTABLES_LOCKFILE="+filepath.Join(lockDir, "xtables.lock"))
	var out strings.Builder
	c.Stdout, c.Stderr = &out, &out
	start := time.Now()
	err = c.Run()
	took := time.Since(start)
	if ctx.Err() != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return took, fmt.Errorf("iptables-%s-restore: not done after %v; stopped", backend, timeout)
	}
	if err != nil {
		return took, fmt.Errorf("iptables-%s-restore: %w: %s", backend, err, strings.TrimSpace(out.String()))
	}
	return took, nil
}

// iptablesVersion is what `iptables-<backend> --version` prints, or "".
func iptablesVersion(backend string) string {
	out, err := exec.Command("iptables-"+backend, "--version").Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}
