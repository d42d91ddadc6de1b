package otelcoltest_test

import (
	"context"
	"crypto/rand"
	"net"
	"reflect"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/sdk/instrumentation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/ktel-dev/ktel/internal/otelcoltest"
	"github.com/ktel-dev/ktel/internal/testenv"
)

func TestParseSpans(t *testing.T) {
	// As the file exporter writes it (pdata's OTLP/JSON), plus the forms
	// protobuf JSON also allows: 64-bit integers as numbers, enums by name.
	const data = `{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"ktel"}},{"key":"host.cpus","value":{"intValue":"2"}}]},"scopeSpans":[{"scope":{"name":"syscall"},"spans":[{"traceId":"0102030405060708090a0b0c0d0e0f10","spanId":"1112131415161718","parentSpanId":"2122232425262728","name":"read","kind":1,"startTimeUnixNano":"1700000000123456789","endTimeUnixNano":"1700000000124956789","attributes":[{"key":"s","value":{"stringValue":"x"}},{"key":"i","value":{"intValue":"-42"}},{"key":"f","value":{"doubleValue":1.5}},{"key":"b","value":{"boolValue":true}},{"key":"a","value":{"arrayValue":{"values":[{"intValue":"1"},{"stringValue":"two"}]}}},{"key":"m","value":{"kvlistValue":{"values":[{"key":"k","value":{"boolValue":false}}]}}},{"key":"bytes","value":{"bytesValue":"AQI="}},{"key":"empty","value":{}}],"status":{"code":2,"message":"EAGAIN"}}]}]}]}

{"resourceSpans":[{"resource":{},"scopeSpans":[{"scope":{},"spans":[{"traceId":"0102030405060708090a0b0c0d0e0f10","spanId":"2122232425262728","name":"root","kind":"SPAN_KIND_SERVER","startTimeUnixNano":1700000000000000000,"endTimeUnixNano":"1700000001000000000","status":{"code":"STATUS_CODE_OK"}}]}]}]}
`
	spans, err := otelcoltest.ParseSpans([]byte(data))
	if err != nil {
		t.Fatal(err)
	}
	want := []otelcoltest.Span{{
		Name: "read", TraceID: "0102030405060708090a0b0c0d0e0f10", SpanID: "1112131415161718",
		ParentSpanID: "2122232425262728", Kind: 1, Scope: "syscall",
		StartTime: time.Unix(1700000000, 123456789).UTC(), EndTime: time.Unix(1700000000, 124956789).UTC(),
		StatusCode: 2, StatusMessage: "EAGAIN",
		Attributes: map[string]any{
			"s": "x", "i": int64(-42), "f": 1.5, "b": true,
			"a":     []any{int64(1), "two"},
			"m":     map[string]any{"k": false},
			"bytes": []byte{1, 2},
			"empty": nil,
		},
		Resource: map[string]any{"service.name": "ktel", "host.cpus": int64(2)},
	}, {
		Name: "root", TraceID: "0102030405060708090a0b0c0d0e0f10", SpanID: "2122232425262728", Kind: 2,
		StartTime: time.Unix(1700000000, 0).UTC(), EndTime: time.Unix(1700000001, 0).UTC(),
		StatusCode: 1, Attributes: map[string]any{}, Resource: map[string]any{},
	}}
	if !reflect.DeepEqual(spans, want) {
		t.Errorf("ParseSpans:\n got %+v\nwant %+v", spans, want)
	}

	if _, err := otelcoltest.ParseSpans([]byte(`{"resourceSpans":[`)); err == nil {
		t.Error("ParseSpans accepted a truncated line")
	}
}

// TestCollector sends a span over each OTLP transport and reads it back.
func TestCollector(t *testing.T) {
	testenv.Privileged(t)
	c := otelcoltest.Start(t)

	for _, proto := range []string{"http", "grpc"} {
		t.Run(proto, func(t *testing.T) {
			exp := newExporter(t, c, proto)
			start := time.Unix(1_700_000_000, 123_456_789)
			end := start.Add(1500 * time.Microsecond)
			sent := send(t, exp, "otelcoltest."+proto, start, end,
				attribute.String("syscall", "read"),
				attribute.Int64("errno", 11),
				attribute.Float64("latency_seconds", 0.0015),
				attribute.Bool("outlier", true),
			)

			spans := c.WaitForSpans(t, 10*time.Second, func(s []otelcoltest.Span) bool {
				return find(s, sent) != nil
			})
			got := find(spans, sent)
			if got.Name != "otelcoltest."+proto || got.TraceID != sent.TraceID().String() || got.Scope != "otelcoltest" {
				t.Errorf("span %+v, want name otelcoltest.%s, trace %s, scope otelcoltest", got, proto, sent.TraceID())
			}
			if !got.StartTime.Equal(start) || !got.EndTime.Equal(end) {
				t.Errorf("span times %v..%v, want %v..%v", got.StartTime, got.EndTime, start, end)
			}
			wantAttrs := map[string]any{"syscall": "read", "errno": int64(11), "latency_seconds": 0.0015, "outlier": true}
			if !reflect.DeepEqual(got.Attributes, wantAttrs) {
				t.Errorf("attributes %v, want %v", got.Attributes, wantAttrs)
			}
			if got.Resource["service.name"] != "otelcoltest" {
				t.Errorf("resource %v, want service.name=otelcoltest", got.Resource)
			}
		})
	}
}

// TestCollectorRestart checks what fault tests rely on: a stopped collector
// refuses connections, and a restarted one listens on the same endpoints
// and keeps what it had written.
func TestCollectorRestart(t *testing.T) {
	testenv.Privileged(t)
	c := otelcoltest.Start(t)
	exp := newExporter(t, c, "http")
	now := time.Now()

	before := send(t, exp, "before", now, now.Add(time.Millisecond))
	c.WaitForSpans(t, 10*time.Second, func(s []otelcoltest.Span) bool { return find(s, before) != nil })

	c.Stop()
	for _, ep := range []string{c.GRPCEndpoint(), c.HTTPEndpoint()[len("http://"):]} {
		if conn, err := net.DialTimeout("tcp", ep, time.Second); err == nil {
			conn.Close()
			t.Errorf("stopped collector still accepts connections on %s", ep)
		}
	}
	if err := exp.ExportSpans(context.Background(), []sdktrace.ReadOnlySpan{stub("lost", now, now)}); err == nil {
		t.Error("export to a stopped collector succeeded")
	}

	c.Restart()
	after := send(t, exp, "after", now, now.Add(time.Millisecond))
	spans := c.WaitForSpans(t, 10*time.Second, func(s []otelcoltest.Span) bool { return find(s, after) != nil })
	if find(spans, before) == nil {
		t.Errorf("span sent before the restart is gone: %+v", spans)
	}
	c.Stop()
	c.Stop() // idempotent
}

func newExporter(t *testing.T, c *otelcoltest.Collector, proto string) sdktrace.SpanExporter {
	t.Helper()
	ctx := context.Background()
	var (
		exp sdktrace.SpanExporter
		err error
	)
	// No retries: a failed export must fail now, not after a minute.
	switch proto {
	case "http":
		exp, err = otlptracehttp.New(ctx, otlptracehttp.WithEndpointURL(c.HTTPEndpoint()+"/v1/traces"),
			otlptracehttp.WithRetry(otlptracehttp.RetryConfig{Enabled: false}), otlptracehttp.WithTimeout(5*time.Second))
	case "grpc":
		exp, err = otlptracegrpc.New(ctx, otlptracegrpc.WithEndpoint(c.GRPCEndpoint()), otlptracegrpc.WithInsecure(),
			otlptracegrpc.WithRetry(otlptracegrpc.RetryConfig{Enabled: false}), otlptracegrpc.WithTimeout(5*time.Second))
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { exp.Shutdown(context.Background()) })
	return exp
}

// send exports one span directly, so that an export error fails the test
// rather than going to the SDK's global error handler.
func send(t *testing.T, exp sdktrace.SpanExporter, name string, start, end time.Time, attrs ...attribute.KeyValue) trace.SpanContext {
	t.Helper()
	s := stub(name, start, end, attrs...)
	if err := exp.ExportSpans(context.Background(), []sdktrace.ReadOnlySpan{s}); err != nil {
		t.Fatalf("export %s: %v", name, err)
	}
	return s.SpanContext()
}

func stub(name string, start, end time.Time, attrs ...attribute.KeyValue) sdktrace.ReadOnlySpan {
	var tid trace.TraceID
	var sid trace.SpanID
	rand.Read(tid[:])
	rand.Read(sid[:])
	return tracetest.SpanStub{
		Name: name,
		SpanContext: trace.NewSpanContext(trace.SpanContextConfig{
			TraceID: tid, SpanID: sid, TraceFlags: trace.FlagsSampled,
		}),
		SpanKind:             trace.SpanKindInternal,
		StartTime:            start,
		EndTime:              end,
		Attributes:           attrs,
		Resource:             resource.NewSchemaless(attribute.String("service.name", "otelcoltest")),
		InstrumentationScope: instrumentation.Scope{Name: "otelcoltest"},
	}.Snapshot()
}

func find(spans []otelcoltest.Span, sc trace.SpanContext) *otelcoltest.Span {
	for i := range spans {
		if spans[i].SpanID == sc.SpanID().String() && spans[i].TraceID == sc.TraceID().String() {
			return &spans[i]
		}
	}
	return nil
}
