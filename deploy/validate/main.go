// Command validate decodes Kubernetes manifests strictly against the API
// types: every object of every YAML stream given (files, or standard input
// with "-") must be of a kind known to client-go's scheme or the Prometheus
// Operator's monitoring/v1, and have no unknown or duplicate field. It is
// its own module so that the daemon's go.mod does not carry client-go.
//
//	kustomize build deploy/kubernetes | go run ./deploy/validate -
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
)

func main() {
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: validate FILE|- ...")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	failed := false
	for _, name := range flag.Args() {
		var (
			data []byte
			err  error
		)
		if name == "-" {
			data, err = io.ReadAll(os.Stdin)
		} else {
			data, err = os.ReadFile(name)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			failed = true
			continue
		}
		objs, err := Decode(data)
		for _, o := range objs {
			fmt.Printf("%s: ok %s %s\n", name, o.GetObjectKind().GroupVersionKind().Kind, objName(o))
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
			failed = true
		}
	}
	if failed {
		os.Exit(1)
	}
}
