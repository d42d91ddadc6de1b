package syscall

import (
	"log/slog"
	"testing"

	"github.com/ktel-dev/ktel/internal/testenv"
)

func TestVariantsLoad(t *testing.T) {
	testenv.Privileged(t)
	for _, v := range Variants {
		t.Run(v.String(), func(t *testing.T) {
			p, err := Load(Options{Schema: 3, Variant: &v}, slog.Default())
			if err != nil {
				t.Fatalf("%+v", err)
			}
			if err := p.Close(); err != nil {
				t.Fatal(err)
			}
		})
	}
}
