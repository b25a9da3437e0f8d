{{/*
Names. "fullname" prefixes every object; it is the release name when that already says
"hapair", else "<release>-hapair", cut to 63 characters (the DNS label limit) minus room
for the longest suffix the chart appends ("-external", 9 characters).
*/}}
{{- define "hapair.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 54 | trimSuffix "-" -}}
{{- end -}}

{{- define "hapair.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "hapair.agentName" -}}
{{- printf "%s-agent" (include "hapair.fullname" .) -}}
{{- end -}}

{{- define "hapair.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "hapair.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "hapair.leaseName" -}}
{{- default (printf "%s-leader" (include "hapair.fullname" .)) .Values.operator.leaderElection.leaseName -}}
{{- end -}}

{{- define "hapair.pkiSecretName" -}}
{{- default (printf "%s-pki" (include "hapair.fullname" .)) .Values.operator.pkiSecretName -}}
{{- end -}}

{{/* The in-cluster DNS name of the node API; the operator's certificate is issued for it. */}}
{{- define "hapair.serverName" -}}
{{- printf "%s.%s.svc" (include "hapair.fullname" .) .Release.Namespace -}}
{{- end -}}

{{/* Labels. */}}
{{- define "hapair.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "hapair.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hapair
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "hapair.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "hapair.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "hapair.agentSelectorLabels" -}}
app.kubernetes.io/name: {{ include "hapair.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "hapair.operatorLabels" -}}
{{ include "hapair.labels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "hapair.agentLabels" -}}
{{ include "hapair.labels" . }}
app.kubernetes.io/component: agent
{{- end -}}

{{/* image reference: repository@digest when a digest is pinned, else repository:tag. */}}
{{- define "hapair.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}
