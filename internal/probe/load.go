package probe

import (
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/ktel-dev/ktel/internal/histogram"
)

// Loaded is what loading a variant leaves: the variant's programs by name,
// their links, and the maps assigned to the probe's objects.
type Loaded struct {
	Programs map[string]*ebpf.Program
	Links    []link.Link
	maps     []*ebpf.Map
}

// LoadVariant loads variant v of spec with LoadAndAssign: v's programs,
// and the maps and variables tagged in each of to (pointers to structs
// with ebpf tags, like the objects bpf2go generates). Only what they name
// is created, with the maps v's programs use: a kernel without task
// storage can still run a hash variant. It then attaches the programs. The
// maps assigned to belong to the Loaded, which closes them. On error
// nothing stays loaded.
func LoadVariant(spec *ebpf.CollectionSpec, v Variant, to ...any) (*Loaded, error) {
	// One struct for LoadAndAssign: each of to, which it walks for tags,
	// then a field per program of the variant.
	var fields []reflect.StructField
	for i, o := range to {
		t := reflect.TypeOf(o)
		if t == nil || t.Kind() != reflect.Pointer || t.Elem().Kind() != reflect.Struct {
			return nil, fmt.Errorf("load objects: %T is not a pointer to a struct", o)
		}
		fields = append(fields, reflect.StructField{Name: fmt.Sprintf("O%d", i), Type: t})
	}
	for i, p := range v.Programs {
		fields = append(fields, reflect.StructField{
			Name: fmt.Sprintf("P%d", i), Type: reflect.TypeFor[*ebpf.Program](),
			Tag: reflect.StructTag(fmt.Sprintf("ebpf:%q", p.Name)),
		})
	}
	objs := reflect.New(reflect.StructOf(fields)).Elem()
	for i, o := range to {
		objs.Field(i).Set(reflect.ValueOf(o))
	}
	if err := spec.LoadAndAssign(objs.Addr().Interface(), nil); err != nil {
		return nil, fmt.Errorf("load programs: %w", err)
	}
	l := &Loaded{Programs: map[string]*ebpf.Program{}}
	for _, o := range to {
		for _, m := range mapsOf(reflect.ValueOf(o).Elem()) {
			if !slices.Contains(l.maps, m) {
				l.maps = append(l.maps, m)
			}
		}
	}
	for i, p := range v.Programs {
		l.Programs[p.Name] = objs.Field(len(to) + i).Interface().(*ebpf.Program)
	}
	var err error
	if l.Links, err = v.Attach(l.Programs); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// mapsOf returns the maps in the fields of struct s, and of the structs it
// embeds or points to.
func mapsOf(s reflect.Value) []*ebpf.Map {
	var out []*ebpf.Map
	for i := range s.NumField() {
		f := s.Field(i)
		switch {
		case f.Type() == reflect.TypeFor[*ebpf.Map]():
			if m := f.Interface().(*ebpf.Map); m != nil {
				out = append(out, m)
			}
		case f.Kind() == reflect.Struct:
			out = append(out, mapsOf(f)...)
		case f.Kind() == reflect.Pointer && f.Type().Elem().Kind() == reflect.Struct && !f.IsNil():
			out = append(out, mapsOf(f.Elem())...)
		}
	}
	return out
}

// Detach detaches the links, in reverse order of attach, and keeps the
// programs and maps: what the programs wrote stays readable until Close.
// It is safe on a nil Loaded, and idempotent.
func (l *Loaded) Detach() error {
	if l == nil {
		return nil
	}
	var cs []interface{ Close() error }
	for _, lk := range slices.Backward(l.Links) {
		cs = append(cs, lk)
	}
	l.Links = nil
	return CloseAll(cs...)
}

// Close detaches the links and closes programs and maps. It is safe on a
// nil or partly built Loaded, and idempotent.
func (l *Loaded) Close() error {
	if l == nil {
		return nil
	}
	// Links first, in reverse order of attach (Detach): a variant
	// attaches the programs that clean up before those that leave state
	// for them.
	detached := l.Detach()
	var cs []interface{ Close() error }
	for _, p := range l.Programs {
		cs = append(cs, p)
	}
	for _, m := range l.maps {
		cs = append(cs, m)
	}
	l.Programs, l.maps = nil, nil
	return errors.Join(detached, CloseAll(cs...))
}

// CloseAll closes each of cs, collecting errors; nil interfaces are
// skipped (ebpf.Map and ebpf.Program also accept nil receivers), so it
// suits a partly constructed probe.
func CloseAll(cs ...interface{ Close() error }) error {
	var errs []error
	for _, c := range cs {
		if c != nil {
			errs = append(errs, c.Close())
		}
	}
	return errors.Join(errs...)
}

// LoadHistogramProbe is Load for probes with latency histograms: it builds
// the slot layout of schema, and returns the first of the variants (those
// using hook, or forced) that load builds and attaches.
func LoadHistogramProbe[T any](schema int, variants []Variant, hook Hook, forced *Variant, log *slog.Logger,
	load func(layout *histogram.Layout, v Variant, ncpu int) (T, error)) (T, error) {
	var zero T
	layout, err := histogram.NewLayout(schema)
	if err != nil {
		return zero, err
	}
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return zero, fmt.Errorf("possible CPUs: %w", err)
	}
	candidates, err := Candidates(variants, hook, forced)
	if err != nil {
		return zero, err
	}
	p, _, err := FirstLoading(candidates, log, func(v Variant) (T, error) { return load(layout, v, ncpu) })
	return p, err
}
