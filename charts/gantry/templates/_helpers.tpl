{{/*
Names, labels, images and the rules the values must follow, shared by every template.
*/}}

{{/*
The chart name, or nameOverride.
*/}}
{{- define "gantry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The name prefix of every object: fullnameOverride, else "<release>-<name>", or the release
name alone when it already contains the name. Truncated to 56 characters so that the
longest suffix ("-server", "-runner"; also "-blobs", "-data", "-s3", "-auth") still fits
Kubernetes' 63-character limit.
*/}}
{{- define "gantry.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 56 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "gantry.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object (and pod) of the release.
*/}}
{{- define "gantry.labels" -}}
helm.sh/chart: {{ include "gantry.chart" . }}
{{ include "gantry.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gantry
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels of the release.
*/}}
{{- define "gantry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gantry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of a component's objects; called with (list $ "server") or (list $ "runner").
*/}}
{{- define "gantry.componentLabels" -}}
{{ include "gantry.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/*
Selector labels of a component's pods; called with (list $ "server") or (list $ "runner").
*/}}
{{- define "gantry.componentSelectorLabels" -}}
{{ include "gantry.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/*
Object names.
*/}}
{{- define "gantry.serverName" -}}
{{- printf "%s-server" (include "gantry.fullname" .) }}
{{- end }}

{{- define "gantry.runnerName" -}}
{{- printf "%s-runner" (include "gantry.fullname" .) }}
{{- end }}

{{- define "gantry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gantry.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Secret holding the registration and API tokens: existingSecret, or the chart's own.
*/}}
{{- define "gantry.authSecretName" -}}
{{- default (printf "%s-auth" (include "gantry.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/*
The Secret holding the PostgreSQL URL: existingSecret, or the chart's own.
*/}}
{{- define "gantry.databaseSecretName" -}}
{{- default (printf "%s-database" (include "gantry.fullname" .)) .Values.database.postgresql.existingSecret }}
{{- end }}

{{/*
The PersistentVolumeClaim of the SQLite database.
*/}}
{{- define "gantry.dataClaimName" -}}
{{- default (printf "%s-data" (include "gantry.fullname" .)) .Values.database.sqlite.persistence.existingClaim }}
{{- end }}

{{/*
The PersistentVolumeClaim of the local blob store (database.type postgresql; with SQLite the
blobs share the database's volume).
*/}}
{{- define "gantry.blobsClaimName" -}}
{{- default (printf "%s-blobs" (include "gantry.fullname" .)) .Values.blobs.local.persistence.existingClaim }}
{{- end }}

{{/*
The Secret holding the S3 credentials: existingSecret, or the chart's own.
*/}}
{{- define "gantry.s3SecretName" -}}
{{- default (printf "%s-s3" (include "gantry.fullname" .)) .Values.blobs.s3.existingSecret }}
{{- end }}

{{/*
The local blob directory in the server container: beside the SQLite file (gantry-server's
own default, on the database's volume), or the mount of the blob volume with PostgreSQL.
*/}}
{{- define "gantry.blobDir" -}}
{{- if eq .Values.database.type "sqlite" }}/var/lib/gantry/gantry.db.blobs{{ else }}/var/lib/gantry/blobs{{ end }}
{{- end }}

{{/*
"true" when the server keeps state that one server at a time may use (SQLite, or a local
blob store): one replica, updated with the Recreate strategy.
*/}}
{{- define "gantry.singleServer" -}}
{{- or (eq .Values.database.type "sqlite") (eq .Values.blobs.type "local") }}
{{- end }}

{{/*
The Secret holding the CA runners trust.
*/}}
{{- define "gantry.caSecretName" -}}
{{- default .Values.tls.secretName .Values.tls.ca.secretName }}
{{- end }}

{{/*
An image reference; called with (dict "root" $ "image" .Values.server.image).
*/}}
{{- define "gantry.image" -}}
{{- $root := .root }}
{{- $tag := .image.tag | default $root.Values.image.tag | default $root.Chart.AppVersion }}
{{- $repository := .image.repository }}
{{- with $root.Values.image.registry }}
{{- $repository = printf "%s/%s" (trimSuffix "/" .) $repository }}
{{- end }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{/*
The gRPC port the server listens on in its pod ("grpc"), and the plaintext health-only
port ("health", opened only when TLS is on: kubelet's gRPC probes cannot speak TLS).
*/}}
{{- define "gantry.grpcPort" -}}50051{{- end }}
{{- define "gantry.healthPort" -}}8081{{- end }}

{{/*
The port kubelet's gRPC probes use: the health port with TLS, the gRPC port without.
A gRPC probe takes a port number only (no named ports), hence the number.
*/}}
{{- define "gantry.probePort" -}}
{{- if .Values.tls.enabled }}{{ include "gantry.healthPort" . }}{{ else }}{{ include "gantry.grpcPort" . }}{{ end }}
{{- end }}

{{/*
The server's URL as the runners (and in-cluster clients) reach it.
*/}}
{{- define "gantry.serverURL" -}}
{{- printf "%s://%s:%d" (ternary "https" "http" .Values.tls.enabled) (include "gantry.serverName" .) (int .Values.server.service.port) }}
{{- end }}

{{/*
Pod security context of the Gantry pods; called with (list $ extraSupplementalGroups).
*/}}
{{- define "gantry.podSecurityContext" -}}
{{- $root := index . 0 }}
{{- $groups := index . 1 -}}
runAsNonRoot: true
runAsUser: {{ $root.Values.securityContext.runAsUser | int64 }}
runAsGroup: {{ $root.Values.securityContext.runAsGroup | int64 }}
fsGroup: {{ $root.Values.securityContext.fsGroup | int64 }}
fsGroupChangePolicy: OnRootMismatch
{{- with $groups }}
supplementalGroups:
{{- range . }}
  - {{ . | int64 }}
{{- end }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Security context of every Gantry container: non-root, read-only root filesystem, no
privilege escalation, no capabilities.
*/}}
{{- define "gantry.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser | int64 }}
runAsGroup: {{ .Values.securityContext.runAsGroup | int64 }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
A component's topology spread constraints, each given the component's selector labels
when it names no labelSelector; called with (list $ "server" constraints).
*/}}
{{- define "gantry.topologySpreadConstraints" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- range index . 2 }}
{{- $c := deepCopy . }}
{{- if not (hasKey $c "labelSelector") }}
{{- $_ := set $c "labelSelector" (dict "matchLabels" (include "gantry.componentSelectorLabels" (list $root $component) | fromYaml)) }}
{{- end }}
- {{ toYaml $c | nindent 2 | trim }}
{{- end }}
{{- end }}

{{/*
Rules across values that the schema cannot say clearly. Each message names the values
and the rule.
*/}}
{{- define "gantry.validate" -}}
{{- $db := .Values.database.type }}
{{- if and (eq $db "sqlite") (gt (int .Values.server.replicas) 1) }}
{{- fail (printf "server.replicas is %d, but database.type is \"sqlite\": SQLite is one file on one volume and allows exactly one server (server.replicas: 1). Use database.type: postgresql for several server replicas." (int .Values.server.replicas)) }}
{{- end }}
{{- if and (eq .Values.blobs.type "local") (gt (int .Values.server.replicas) 1) }}
{{- fail (printf "server.replicas is %d, but blobs.type is \"local\": a local blob store is one directory on one server's volume and allows exactly one server (server.replicas: 1). Use blobs.type: s3 (a bucket every replica shares) for several server replicas." (int .Values.server.replicas)) }}
{{- end }}
{{- if and (eq .Values.blobs.type "s3") (not .Values.blobs.s3.bucket) }}
{{- fail "blobs.type is \"s3\", but blobs.s3.bucket is empty: name the bucket the server keeps artifacts and uploaded inputs in." }}
{{- end }}
{{- if and (eq .Values.blobs.type "s3") (not .Values.blobs.s3.existingSecret) (not (and .Values.blobs.s3.accessKeyId .Values.blobs.s3.secretAccessKey)) }}
{{- fail "blobs.type is \"s3\", but the credentials are missing: set blobs.s3.existingSecret (a Secret with the keys blobs.s3.accessKeyIdKey and blobs.s3.secretAccessKeyKey), or both blobs.s3.accessKeyId and blobs.s3.secretAccessKey." }}
{{- end }}
{{- /* GANTRY_MAX_MESSAGE_BYTES: the server's default, or a literal value in server.extraEnv
(one from a Secret or ConfigMap cannot be checked here). */}}
{{- $messageBytes := 4194304 }}
{{- $known := true }}
{{- range .Values.server.extraEnv }}
{{- if eq .name "GANTRY_MAX_MESSAGE_BYTES" }}
{{- if hasKey . "value" }}
{{- $messageBytes = .value | int64 }}
{{- else }}
{{- $known = false }}
{{- end }}
{{- end }}
{{- end }}
{{- if and $known (gt (add (.Values.blobs.maxResultBytes | int64) 4096) ($messageBytes | int64)) }}
{{- fail (printf "blobs.maxResultBytes is %d, but the server's message limit (GANTRY_MAX_MESSAGE_BYTES) is %d: a result must leave 4096 bytes within it, so at most %d. Lower blobs.maxResultBytes, or raise GANTRY_MAX_MESSAGE_BYTES in server.extraEnv." (.Values.blobs.maxResultBytes | int64) ($messageBytes | int64) (sub ($messageBytes | int64) 4096)) }}
{{- end }}
{{- if and (eq $db "postgresql") (not .Values.database.postgresql.url) (not .Values.database.postgresql.existingSecret) }}
{{- fail "database.type is \"postgresql\", but neither database.postgresql.url nor database.postgresql.existingSecret is set: the server needs a connection URL (postgres://USER:PASSWORD@HOST:5432/DATABASE)." }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled is true, but tls.secretName is empty: name a kubernetes.io/tls Secret (keys tls.crt and tls.key) holding the server's certificate." }}
{{- end }}
{{- if and .Values.runner.enabled (has "docker" .Values.runner.executors) (eq .Values.runner.docker.mode "none") }}
{{- fail "runner.executors offers \"docker\", but runner.docker.mode is \"none\": choose runner.docker.mode dind or hostPath, or offer only runner.executors: [process]." }}
{{- end }}
{{- end }}
