{{/*
Names. Kubernetes names are at most 63 characters (DNS labels), so every
name is cut there and a trailing "-" removed.
*/}}
{{- define "tallyman.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tallyman.fullname" -}}
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

{{/* A name derived from the full name: (dict "ctx" $ "suffix" "metrics"). */}}
{{- define "tallyman.suffixed" -}}
{{- $full := include "tallyman.fullname" .ctx }}
{{- printf "%s-%s" ($full | trunc (int (sub 62 (len .suffix)))) .suffix | trimSuffix "-" }}
{{- end }}

{{- define "tallyman.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tallyman.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tallyman.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tallyman.leaseName" -}}
{{- default (include "tallyman.fullname" .) .Values.operator.leaseName }}
{{- end }}

{{/*
Selector labels: stable for the life of a release (a Deployment's selector
is immutable), so neither the version nor commonLabels are in them.
*/}}
{{- define "tallyman.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tallyman.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Every object's labels. */}}
{{- define "tallyman.labels" -}}
helm.sh/chart: {{ include "tallyman.chart" . }}
{{ include "tallyman.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: tallyman
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The metadata.annotations block: commonAnnotations merged with extra ones,
nothing at all when both are empty. (dict "ctx" $ "extra" map "indent" n),
indent defaulting to 2; call it right after the labels with "{{-".
*/}}
{{- define "tallyman.annotations" -}}
{{- $all := merge (dict) (.extra | default dict) .ctx.Values.commonAnnotations }}
{{- with $all }}
{{- $n := int ($.indent | default 2) }}
{{ "annotations:" | indent $n }}
{{ toYaml . | indent (add $n 2 | int) }}
{{- end }}
{{- end }}

{{/*
The image reference: registry (global.imageRegistry wins), repository, then
"@digest" when a digest is set, else ":tag" (default: appVersion).
*/}}
{{- define "tallyman.image" -}}
{{- $registry := default .Values.image.registry .Values.global.imageRegistry }}
{{- $repo := .Values.image.repository }}
{{- if $registry }}
{{- $repo = printf "%s/%s" $registry $repo }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repo .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The restricted Pod Security Standard, for the pod and its container. */}}
{{- define "tallyman.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "tallyman.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}
