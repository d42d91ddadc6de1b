package config

import (
	"fmt"
	"io"
	"reflect"
	"strings"
	"text/tabwriter"
)

// Field describes one variable, from the Config struct tags.
type Field struct {
	Var     string // full name, with the prefix
	Default string
	Values  string
	Desc    string
}

// Fields lists every variable in declaration order.
func Fields() []Field {
	t := reflect.TypeFor[Config]()
	out := make([]Field, 0, t.NumField())
	for i := range t.NumField() {
		tag := t.Field(i).Tag
		out = append(out, Field{
			Var:     tag.Get("envconfig"),
			Default: tag.Get("default"),
			Values:  tag.Get("values"),
			Desc:    tag.Get("desc"),
		})
	}
	return out
}

func fieldByVar(name string) (Field, bool) {
	for _, f := range Fields() {
		if f.Var == name {
			return f, true
		}
	}
	return Field{Var: name}, false
}

// Usage writes the variables with their defaults, accepted values and
// meaning, for `ktel --help`.
func Usage(w io.Writer) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "VARIABLE\tDEFAULT\tVALUES\tMEANING")
	for _, f := range Fields() {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", f.Var, orDash(f.Default), f.Values, f.Desc)
	}
	tw.Flush()
}

// Markdown renders the same reference as a Markdown table, for README.md.
func Markdown() string {
	var b strings.Builder
	b.WriteString("| Variable | Default | Values | Meaning |\n|---|---|---|---|\n")
	for _, f := range Fields() {
		fmt.Fprintf(&b, "| `%s` | `%s` | %s | %s |\n", f.Var, f.Default, strings.ReplaceAll(f.Values, "|", "\\|"), f.Desc)
	}
	return b.String()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
