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
ClusterRole: exactly the requests selfreward/controller.py and kopf 1.45 send (kopf is
used with on.event handlers only, its own Event posting off, and its scanning off in
the namespaced mode).
- selfrewardruns: list + watch (kopf's watch stream); patch of the main object for the
  selfreward.dev/artifacts finalizer (spec.storage.deleteOnRunDeletion). The operator
  never GETs or PUTs a run: it works from the watch stream.
- selfrewardruns/status: merge patches of the status subresource, nothing else.
- batch jobs: list (at start, by the selfreward.dev/run label) + watch (kopf), create,
  get (reading back a Job whose create answered 409: adoption), patch (suspend/resume),
  delete (retries, cleanup).
- pods: list + watch only, for the Jobs' pods' termination messages and waiting
  reasons (OOMKilled, ImagePullBackOff, Unschedulable).
- events: create (core v1 Events about runs); events.k8s.io is never written.
- services: create only: a run whose sft/train step spans several nodes gets one
  headless Service (its pods' DNS names for the rendezvous), owned by the run so the
  garbage collector deletes it; a 409 means it exists, and nothing reads it back.
- No secrets: credentials reach the workers only as secretKeyRefs in the Jobs' pod
  specs, which the kubelet resolves; creating such a Job needs no secret access.
*/}}
{{- define "selfreward.rbacRules" -}}
- apiGroups: ["selfreward.dev"]
  resources: ["selfrewardruns"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["selfreward.dev"]
  resources: ["selfrewardruns/status"]
  verbs: ["patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create"]
{{- end -}}
