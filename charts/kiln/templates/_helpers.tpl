{{/* Name of the chart (app.kubernetes.io/name of the controller's objects). */}}
{{- define "kiln.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name of the controller's objects. */}}
{{- define "kiln.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-controller" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object of this chart. */}}
{{- define "kiln.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/part-of: kiln
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector of the controller's pods (name kiln-controller: never matched by a pool's selectors). */}}
{{- define "kiln.controllerSelector" -}}
app.kubernetes.io/name: {{ include "kiln.name" . }}-controller
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{/* The controller's ServiceAccount. */}}
{{- define "kiln.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kiln.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Selector of one component of the default pool, as kiln-controller labels it (render.rs). */}}
{{- define "kiln.poolSelector" -}}
app.kubernetes.io/name: kiln
app.kubernetes.io/instance: {{ .root.Values.defaultPool.name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* image: repository:tag, the tag defaulting to appVersion. */}}
{{- define "kiln.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* The Secret with the users' client certificate: the controller's <pool>-client-tls, or tls.secretName. */}}
{{- define "kiln.clientSecret" -}}
{{- if eq .Values.defaultPool.tls.mode "existingSecret" -}}
{{- .Values.defaultPool.tls.secretName -}}
{{- else -}}
{{- printf "%s-client-tls" .Values.defaultPool.name -}}
{{- end -}}
{{- end -}}

{{/* The gateway's in-cluster address for `kiln build --addr`. */}}
{{- define "kiln.gatewayAddr" -}}
{{- printf "tcp://%s-gateway.%s.svc:%v" .Values.defaultPool.name .Release.Namespace .Values.defaultPool.gateway.port -}}
{{- end -}}
