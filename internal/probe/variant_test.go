package probe

import (
	"slices"
	"testing"
)

// Which variants are tried for each hook setting: tp_btf ones only unless
// a hook or a variant is forced, in the order given.
func TestCandidates(t *testing.T) {
	btfCPU := Variant{Hook: HookBTF, Storage: StorageCPU}
	btfHash := Variant{Hook: HookBTF, Storage: StorageHash}
	rawHash := Variant{Hook: HookRaw, Storage: StorageHash}
	tpHash := Variant{Hook: HookTracepoint, Storage: StorageHash}
	all := []Variant{btfCPU, btfHash, rawHash, tpHash}
	forced := Variant{Hook: HookRaw, Storage: StorageTask}
	for _, tc := range []struct {
		variants []Variant
		hook     Hook
		forced   *Variant
		want     []Variant // nil: an error
	}{
		{all, HookAuto, nil, []Variant{btfCPU, btfHash}},
		{all, "", nil, []Variant{btfCPU, btfHash}},
		{all, HookBTF, nil, []Variant{btfCPU, btfHash}},
		{all, HookRaw, nil, []Variant{rawHash}},
		{all, HookTracepoint, nil, []Variant{tpHash}},
		{all, HookAuto, &forced, []Variant{forced}},
		{all, HookTracepoint, &forced, []Variant{forced}},
		{[]Variant{tpHash, btfHash}, HookAuto, nil, []Variant{btfHash}},
		{[]Variant{btfCPU}, HookRaw, nil, nil},
		{[]Variant{rawHash, tpHash}, HookAuto, nil, nil},
		{all, "kprobe", nil, nil},
	} {
		got, err := Candidates(tc.variants, tc.hook, tc.forced)
		if tc.want == nil {
			if err == nil {
				t.Errorf("Candidates(%v, %q) = %v, want an error", tc.variants, tc.hook, got)
			}
			continue
		}
		if err != nil || !slices.EqualFunc(got, tc.want, func(a, b Variant) bool { return a.String() == b.String() }) {
			t.Errorf("Candidates(%v, %q, %v) = %v, %v; want %v", tc.variants, tc.hook, tc.forced, got, err, tc.want)
		}
	}
}
