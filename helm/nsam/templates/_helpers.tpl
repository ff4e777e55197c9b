{{/* Names and labels only. */}}

{{/* Chart name, overridable. */}}
{{- define "nsam.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every resource name: `<release>-<chart>`, or the release name if it already holds the chart name. */}}
{{- define "nsam.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Component names. */}}
{{- define "nsam.server.fullname" -}}
{{- printf "%s-server" (include "nsam.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "nsam.worker.fullname" -}}
{{- printf "%s-worker" (include "nsam.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "nsam.redis.fullname" -}}
{{- printf "%s-redis" (include "nsam.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* ServiceAccount name. */}}
{{- define "nsam.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "nsam.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the API-keys file. */}}
{{- define "nsam.apiKeys.secretName" -}}
{{- default (printf "%s-api-keys" (include "nsam.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{/* Name of the Secret holding the external Redis URL. */}}
{{- define "nsam.externalRedis.secretName" -}}
{{- default (printf "%s-redis-url" (include "nsam.fullname" .)) .Values.externalRedis.existingSecret }}
{{- end }}

{{/* Image reference for nsam containers: the tag defaults to `<appVersion>-<variant>`. */}}
{{- define "nsam.image" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) .Values.image.tag) }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "nsam.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "nsam.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nsam
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels shared by all components; add app.kubernetes.io/component per component. */}}
{{- define "nsam.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nsam.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Name of the Secret holding the in-chart Redis password. */}}
{{- define "nsam.redis.authSecretName" -}}
{{- default (printf "%s-redis-auth" (include "nsam.fullname" .)) .Values.redis.auth.existingSecret }}
{{- end }}
