import type { Dashboard } from "@grafana/schema";

// JsonOf<T> is T as a JSON file can spell it: @grafana/schema declares some
// fields as TypeScript string enums (MappingType, ThresholdsMode,
// FieldColorModeId, ...), to which a JSON string is never assignable, even
// when it is exactly the enum's value. `${E}` of a string enum is the union
// of its values, so they are checked all the same. Everything else
// (required fields, other unions, unknown properties) is unchanged.
export type JsonOf<T> = T extends string
  ? `${T}`
  : T extends readonly (infer U)[]
    ? JsonOf<U>[]
    : T extends object
      ? { [K in keyof T]: JsonOf<T[K]> }
      : T;

export type DashboardJson = JsonOf<Dashboard>;
