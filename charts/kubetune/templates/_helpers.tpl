{{/* Names and labels shared by every template. */}}

{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* release-chart, or the release name alone when it already contains the chart name. */}}
{{- define "kubetune.fullname" -}}
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

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object of the release. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}

{{/* The operator pod's selector. component=operator keeps it apart from the stage pods,
which share app.kubernetes.io/name=kubetune. */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kubetune.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "kubetune.trainerImage" -}}
{{- default (printf "ghcr.io/kubetune/trainer:%s" .Chart.AppVersion) .Values.operator.trainerImage }}
{{- end }}

{{/* True when the cluster serves the Prometheus Operator's API (ServiceMonitor, PodMonitor,
PrometheusRule). `helm template --api-versions monitoring.coreos.com/v1` turns it on offline. */}}
{{- define "kubetune.hasMonitoringAPI" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end }}
{{- end }}

{{- /* The namespaces the operator watches, as a JSON list (include ... | fromJsonArray):
watchNamespaces plus the deprecated watchNamespace, without repeats; [] means every namespace.
The Deployment's KUBETUNE_NAMESPACE is the same list, comma-separated. */ -}}
{{- define "kubetune.watchNamespaces" -}}
{{- concat (.Values.watchNamespaces | default list) (compact (list .Values.watchNamespace)) | uniq | toJson }}
{{- end }}
