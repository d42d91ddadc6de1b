{{- define "ktel.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ktel.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ktel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ktel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ktel.labels" -}}
{{ include "ktel.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* hostNetwork: forced by .Values.hostNetwork, else on exactly with netdev. */}}
{{- define "ktel.hostNetwork" -}}
{{- if kindIs "bool" .Values.hostNetwork -}}
{{- .Values.hostNetwork -}}
{{- else -}}
{{- has "netdev" .Values.probes -}}
{{- end -}}
{{- end -}}

{{/* The service account: the chart's, or serviceAccount.name. */}}
{{- define "ktel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ktel.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}
