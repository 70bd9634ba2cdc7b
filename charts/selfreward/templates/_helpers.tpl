{{/* Names, labels and the lists every template shares. */}}

{{- define "selfreward.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "selfreward.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "selfreward.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "selfreward.selectorLabels" -}}
app.kubernetes.io/name: {{ include "selfreward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "selfreward.labels" -}}
helm.sh/chart: {{ include "selfreward.chart" . }}
app.kubernetes.io/name: {{ include "selfreward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: selfreward
{{- end -}}

{{- define "selfreward.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "selfreward.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "selfreward.workerServiceAccountName" -}}
{{- default (printf "%s-worker" (include "selfreward.fullname" .)) .Values.workerServiceAccount.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The namespaces served in namespaced mode: the list, or the release namespace. */}}
{{- define "selfreward.watchNamespaces" -}}
{{- $ns := .Values.watch.namespaces -}}
{{- if not $ns -}}{{- $ns = list .Release.Namespace -}}{{- end -}}
{{- toJson (uniq $ns) -}}
{{- end -}}

{{/* Where the worker ServiceAccount goes. */}}
{{- define "selfreward.workerNamespaces" -}}
{{- if eq .Values.watch.mode "cluster" -}}
{{- $ns := .Values.workerServiceAccount.namespaces -}}
{{- if not $ns -}}{{- $ns = list .Release.Namespace -}}{{- end -}}
{{- toJson (uniq $ns) -}}
{{- else -}}
{{- include "selfreward.watchNamespaces" . -}}
{{- end -}}
{{- end -}}

{{- define "selfreward.peeringName" -}}
{{- default (include "selfreward.fullname" .) .Values.peering.name -}}
{{- end -}}

{{- define "selfreward.imageRef" -}}
{{- $tag := default .chart.AppVersion .image.tag -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/*
The operator's permissions, shared by the namespaced Roles and the cluster-wide
ClusterRole. Each verb is one the operator sends (kopf 1.45 and our controller):
- selfrewardruns: kopf lists and watches them, and patches the main object for its
  finalizer and its annotations (last-handled configuration, handler progress).
  kopf never sends PUT (update), so update is not granted.
- selfrewardruns/status: the controller and kopf write status with merge patches to
  the status subresource; get for reading it back.
- batch jobs: one Job per phase and attempt; list/watch by the selfreward.dev/run label,
  patch to suspend/resume (spec.suspend), delete on retries and cleanup.
- pods: read-only, for the Jobs' pods' termination messages and waiting reasons
  (OOMKilled, ImagePullBackOff, Unschedulable).
- events: kopf posts core v1 Events (POST only); patch lets a client that aggregates
  repeated Events update the count. events.k8s.io is never written.
- No secrets: credentials reach the workers only as secretKeyRefs in the Jobs' pod
  specs, which the Job controller resolves; creating such a Job needs no secret access.
*/}}
{{- define "selfreward.rbacRules" -}}
- apiGroups: ["selfreward.dev"]
  resources: ["selfrewardruns"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["selfreward.dev"]
  resources: ["selfrewardruns/status"]
  verbs: ["get", "patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
