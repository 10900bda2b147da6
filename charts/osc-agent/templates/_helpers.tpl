{{/*
Helpers of the osc-agent chart.

Library use (README "Use from another chart"): a parent chart lists osc-agent as a dependency, sets
`osc-agent.standalone.enabled: false` (no Deployment of its own, only the credentials Secret and templates
ConfigMap its helpers refer to) and includes, in its own pod spec, with the context
  $osc := dict "Values" (index .Values "osc-agent") "Release" .Release "Capabilities" .Capabilities
the templates:
  osc-agent.initContainer   the --once init container (or nothing with nativeSidecar)
  osc-agent.sidecar         the long-running agent (an init container with restartPolicy Always when native)
  osc-agent.volumes         the volumes both need
  osc-agent.appVolumeMounts the app container's view of the output (files mode, or the object's volume)
  osc-agent.appEnvFrom      the app container's envFrom of the produced Secret/ConfigMap
  osc-agent.podAnnotations  checksum annotations (templates) that roll the pods when they change
  osc-agent.roleRules       the least-privilege Role rules the agent needs (add them to the parent's Role)
None of them reads .Chart: the agent image tag defaults to osc-agent.defaultTag, never to the including
chart's appVersion.
*/}}

{{/* The agent version this chart was released with: the image tag when image.tag is empty. Equal to
Chart.yaml's appVersion (a test checks it); a constant so that a parent chart's .Chart never leaks in. */}}
{{- define "osc-agent.defaultTag" -}}
0.1.0
{{- end -}}

{{- define "osc-agent.name" -}}
{{- .Values.nameOverride | default "osc-agent" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "osc-agent.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "osc-agent.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "osc-agent.labels" -}}
{{ include "osc-agent.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service | default "Helm" }}
app.kubernetes.io/version: {{ .Values.image.tag | default (include "osc-agent.defaultTag" .) | quote }}
{{- with .Chart }}
helm.sh/chart: {{ printf "%s-%s" .Name .Version | replace "+" "_" }}
{{- end }}
{{- end -}}

{{- define "osc-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "osc-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "osc-agent.image" -}}
{{- $tag := .Values.image.tag | default (include "osc-agent.defaultTag" .) -}}
{{- printf "%s:%s" .Values.image.repository (toString $tag) -}}
{{- end -}}

{{/* "true" in init-only mode (a --once init container, no sidecar). */}}
{{- define "osc-agent.initOnly" -}}
{{- if eq (.Values.runMode | default "sidecar") "init-only" -}}true{{- end -}}
{{- end -}}

{{/* Types of the configured actions, as a list. */}}
{{- define "osc-agent.actionTypes" -}}
{{- $types := list -}}
{{- range .Values.actions }}{{ $types = append $types (required "every item of actions needs a type" .type) }}{{ end -}}
{{- toJson $types -}}
{{- end -}}

{{/* "true" when the agent needs the Kubernetes API (and so a ServiceAccount and a Role). */}}
{{- define "osc-agent.needsApi" -}}
{{- $types := include "osc-agent.actionTypes" . | fromJsonArray -}}
{{- if or (has .Values.output.mode (list "configmap" "secret")) (not .Values.environment) .Values.output.ownerReference (has "rollout-restart" $types) -}}
true
{{- end -}}
{{- end -}}

{{/* "true" when an action signals processes (shared PID namespace, KILL capability). */}}
{{- define "osc-agent.needsProcesses" -}}
{{- $types := include "osc-agent.actionTypes" . | fromJsonArray -}}
{{- if or (has "signal" $types) (has "restart-container" $types) -}}
true
{{- end -}}
{{- end -}}

{{/* "true" when the pod runs under a ServiceAccount of its own: the agent needs the API, a name is given,
or the token is asked for (serviceAccount.automount: true). */}}
{{- define "osc-agent.usesServiceAccount" -}}
{{- $sa := .Values.serviceAccount -}}
{{- if or (include "osc-agent.needsApi" .) $sa.name (eq (toString $sa.automount) "true") -}}
true
{{- end -}}
{{- end -}}

{{- define "osc-agent.serviceAccountName" -}}
{{- if and (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) (include "osc-agent.usesServiceAccount" .) -}}
{{- fail "serviceAccount.create is false: set serviceAccount.name to the existing ServiceAccount the pods run as" -}}
{{- end -}}
{{- .Values.serviceAccount.name | default (include "osc-agent.fullname" .) -}}
{{- end -}}

{{/* automountServiceAccountToken of the pod: serviceAccount.automount when set, else only when the agent
needs the API. */}}
{{- define "osc-agent.automount" -}}
{{- $auto := .Values.serviceAccount.automount -}}
{{- if kindIs "invalid" $auto -}}
{{- ternary "true" "false" (eq (include "osc-agent.needsApi" .) "true") -}}
{{- else if and (not $auto) (include "osc-agent.needsApi" .) -}}
{{- fail "serviceAccount.automount is false, but the agent needs the Kubernetes API (configmap/secret output, environment from the pod, ownerReference or rollout-restart): leave it empty (null) or true" -}}
{{- else -}}
{{- ternary "true" "false" $auto -}}
{{- end -}}
{{- end -}}

{{- define "osc-agent.credentialsSecret" -}}
{{- .Values.credentials.existingSecret | default (printf "%s-credentials" (include "osc-agent.fullname" .)) -}}
{{- end -}}

{{- define "osc-agent.objectName" -}}
{{- .Values.output.objectName | default (include "osc-agent.fullname" .) -}}
{{- end -}}

{{/* The Deployment a rollout-restart action patches: this chart's, or deploymentName in library use. */}}
{{- define "osc-agent.deploymentName" -}}
{{- .deploymentName | default (include "osc-agent.fullname" .) -}}
{{- end -}}

{{/* One action as the --action flag's TYPE:key=value,... form (values.schema.json checks the fields). */}}
{{- define "osc-agent.actionArg" -}}
{{- $fields := list -}}
{{- $type := .type -}}
{{- range $k, $v := omit . "type" -}}
{{- if kindIs "slice" $v -}}{{- $v = join " " $v -}}{{- end -}}
{{- if contains "," (toString $v) -}}
{{- fail (printf "actions: the %s field %s of a %s action holds a comma, which the --action flag cannot carry" $k (toString $v | quote) $type) -}}
{{- end -}}
{{- $fields = append $fields (printf "%s=%v" $k $v) -}}
{{- end -}}
{{- $type -}}{{- if $fields -}}:{{- join "," $fields -}}{{- end -}}
{{- end -}}

{{/* Checks of combinations the schema cannot express, with messages naming the values. Needs
.Capabilities for the Kubernetes version (skipped without it). */}}
{{- define "osc-agent.validate" -}}
{{- $v := .Values -}}
{{- if and $v.nativeSidecar .Capabilities -}}
{{- if semverCompare "<1.29-0" .Capabilities.KubeVersion.Version -}}
{{- fail (printf "nativeSidecar: true needs Kubernetes >= 1.29 (init containers with restartPolicy: Always); this cluster is %s. Set nativeSidecar: false (a --once init container plus a regular sidecar)." .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- end -}}
{{- if and (include "osc-agent.needsProcesses" .) $v.app.enabled -}}
{{- $podSc := $v.podSecurityContext | default dict -}}
{{- $agentSc := $v.securityContext | default dict -}}
{{- $appSc := $v.app.securityContext | default dict -}}
{{- $agentUid := "65532" -}}
{{- if hasKey $podSc "runAsUser" }}{{ $agentUid = toString $podSc.runAsUser }}{{ end -}}
{{- if hasKey $agentSc "runAsUser" }}{{ $agentUid = toString $agentSc.runAsUser }}{{ end -}}
{{- $appUid := "" -}}
{{- if hasKey $podSc "runAsUser" }}{{ $appUid = toString $podSc.runAsUser }}{{ end -}}
{{- if hasKey $appSc "runAsUser" }}{{ $appUid = toString $appSc.runAsUser }}{{ end -}}
{{- if and (ne $agentUid "0") $appUid (ne $agentUid $appUid) -}}
{{- fail (printf "actions: signal and restart-container need the app to run as the agent's user: the agent runs as %v, the app as %v. A non-root process keeps no capability (KILL included) across exec in Kubernetes, so it may only signal its own user's processes. Set app.securityContext.runAsUser to %v (or leave it unset: the pod's podSecurityContext.runAsUser applies to both)." $agentUid $appUid $agentUid) -}}
{{- end -}}
{{- end -}}
{{- if include "osc-agent.initOnly" . -}}
{{- if $v.actions -}}
{{- fail "runMode: init-only syncs once before the app starts: actions need the sidecar (runMode: sidecar) — remove them" -}}
{{- end -}}
{{- if $v.nativeSidecar -}}
{{- fail "runMode: init-only runs no sidecar: set nativeSidecar: false" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The agent's flags shared by the init container and the sidecar, each quoted (a value may hold ": "
or "#"). */}}
{{- define "osc-agent.args" -}}
{{- $v := .Values -}}
- {{ printf "--server=%s" (required "server.url is required" $v.server.url) | quote }}
{{- with $v.environment }}
- {{ printf "--environment=%s" . | quote }}
{{- end }}
- {{ printf "--user-key-file=/var/run/secrets/osc-agent/%s" (required "credentials.userKeyKey is required" $v.credentials.userKeyKey) | quote }}
{{- with $v.credentials.apiKeyKey }}
- {{ printf "--api-key-file=/var/run/secrets/osc-agent/%s" . | quote }}
{{- end }}
{{- with $v.credentials.tokenKey }}
- {{ printf "--token-file=/var/run/secrets/osc-agent/%s" . | quote }}
{{- end }}
{{- if $v.server.caSecret.name }}
- {{ printf "--ca-file=/var/run/secrets/osc-agent-ca/%s" $v.server.caSecret.key | quote }}
{{- end }}
{{- if $v.server.insecureSkipTlsVerify }}
- --insecure-skip-tls-verify
{{- end }}
{{- with $v.fallbackBackup }}{{ if .secretName }}
- {{ printf "--fallback-backup=/var/run/secrets/osc-agent-backup/%s" .backupKey | quote }}
- {{ printf "--backup-password-file=/var/run/secrets/osc-agent-backup/%s" .passwordKey | quote }}
{{- end }}{{ end }}
{{- range $v.selection.include }}
- {{ printf "--include=%s" . | quote }}
{{- end }}
{{- range $v.selection.exclude }}
- {{ printf "--exclude=%s" . | quote }}
{{- end }}
{{- range $v.selection.categories }}
- {{ printf "--category=%s" . | quote }}
{{- end }}
{{- if eq $v.output.mode "files" }}
- {{ printf "--output-dir=%s" $v.output.mountPath | quote }}
- {{ printf "--file-mode=%v" $v.output.fileMode | quote }}
- {{ printf "--value-format=%s" $v.output.valueFormat | quote }}
{{- range $v.output.aggregates }}
- {{ printf "--output=%s/%s:%s" $v.output.mountPath .name .format | quote }}
{{- end }}
{{- range $name, $_ := $v.templates }}
- {{ printf "--template=/etc/osc-agent/templates/%s:%s/%s" $name $v.output.mountPath $name | quote }}
{{- end }}
{{- else if eq $v.output.mode "configmap" }}
- {{ printf "--configmap=%s" (include "osc-agent.objectName" .) | quote }}
{{- else if eq $v.output.mode "secret" }}
- {{ printf "--secret=%s" (include "osc-agent.objectName" .) | quote }}
{{- else }}
{{- fail (printf "output.mode must be files, configmap or secret, not %q" $v.output.mode) }}
{{- end }}
{{- if $v.output.forceConflicts }}
- --force-conflicts
{{- end }}
{{- if $v.output.ownerReference }}
- --owner-reference
{{- end }}
- {{ printf "--log-format=%s" $v.logFormat | quote }}
{{- range $v.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Flags only the long-running sidecar takes: actions (never in the --once init container, where the
app is not running yet) and the admin server. */}}
{{- define "osc-agent.sidecarArgs" -}}
{{- $v := .Values -}}
{{- range $v.actions }}
- {{ printf "--action=%s" (include "osc-agent.actionArg" .) | quote }}
{{- end }}
{{- if $v.actions }}
- {{ printf "--act-on-start=%v" $v.actOnStart | quote }}
- {{ printf "--action-cooldown=%v" $v.actionCooldown | quote }}
- {{ printf "--max-actions=%v" $v.maxActions | quote }}
- {{ printf "--action-window=%v" $v.actionWindow | quote }}
{{- end }}
- {{ printf "--admin-addr=%s:%v" ($v.admin.address | default "0.0.0.0") $v.admin.port | quote }}
{{- end -}}

{{- define "osc-agent.env" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "osc-agent.securityContext" -}}
{{- $sc := deepCopy .Values.securityContext -}}
{{- if include "osc-agent.needsProcesses" . -}}
{{- $caps := $sc.capabilities | default dict -}}
{{- $_ := set $caps "add" (list "KILL") -}}
{{- $_ := set $sc "capabilities" $caps -}}
{{- end -}}
{{- toYaml $sc -}}
{{- end -}}

{{- define "osc-agent.mounts" -}}
- name: osc-agent-credentials
  mountPath: /var/run/secrets/osc-agent
  readOnly: true
{{- if .Values.server.caSecret.name }}
- name: osc-agent-ca
  mountPath: /var/run/secrets/osc-agent-ca
  readOnly: true
{{- end }}
{{- if .Values.fallbackBackup.secretName }}
- name: osc-agent-backup
  mountPath: /var/run/secrets/osc-agent-backup
  readOnly: true
{{- end }}
{{- if eq .Values.output.mode "files" }}
- name: osc-agent-output
  mountPath: {{ .Values.output.mountPath }}
{{- if .Values.templates }}
- name: osc-agent-templates
  mountPath: /etc/osc-agent/templates
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{/* The long-running agent container (nothing in init-only mode). With nativeSidecar it belongs in
initContainers (restartPolicy: Always), else in containers. */}}
{{- define "osc-agent.sidecar" -}}
{{- include "osc-agent.validate" . -}}
{{- if not (include "osc-agent.initOnly" .) -}}
- name: osc-agent
  image: {{ include "osc-agent.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    {{- include "osc-agent.args" . | trim | nindent 4 }}
    {{- include "osc-agent.sidecarArgs" . | trim | nindent 4 }}
  env:
    {{- include "osc-agent.env" . | nindent 4 }}
  ports:
    - name: admin
      containerPort: {{ .Values.admin.port }}
      protocol: TCP
  {{- with .Values.livenessProbe }}
  livenessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.readinessProbe }}
  readinessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .Values.nativeSidecar }}
  {{- with .Values.startupProbe }}
  startupProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  restartPolicy: Always
  {{- end }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- include "osc-agent.securityContext" . | nindent 4 }}
  volumeMounts:
    {{- include "osc-agent.mounts" . | nindent 4 }}
{{- end -}}
{{- end -}}

{{/* The --once init container: the app starts with its files present. Nothing with nativeSidecar (the
sidecar's startup probe holds the app instead) or with initContainer: false (unless init-only). */}}
{{- define "osc-agent.initContainer" -}}
{{- include "osc-agent.validate" . -}}
{{- if or (include "osc-agent.initOnly" .) (and .Values.initContainer (not .Values.nativeSidecar)) -}}
- name: osc-agent-init
  image: {{ include "osc-agent.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - --once
    {{- include "osc-agent.args" . | trim | nindent 4 }}
  env:
    {{- include "osc-agent.env" . | nindent 4 }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    {{- include "osc-agent.mounts" . | nindent 4 }}
{{- end -}}
{{- end -}}

{{/* The agent containers that go in initContainers, in order: the --once init container or the native
sidecar. Empty when there is none. */}}
{{- define "osc-agent.initContainers" -}}
{{- if .Values.nativeSidecar -}}
{{- include "osc-agent.sidecar" . -}}
{{- else -}}
{{- include "osc-agent.initContainer" . -}}
{{- end -}}
{{- end -}}

{{- define "osc-agent.volumes" -}}
{{- if not (or .Values.credentials.existingSecret .Values.credentials.userKey) -}}
{{- fail "credentials.userKey (or credentials.existingSecret) is required for the agent's pods" -}}
{{- end -}}
- name: osc-agent-credentials
  secret:
    secretName: {{ include "osc-agent.credentialsSecret" . }}
    defaultMode: 288
{{- if .Values.server.caSecret.name }}
- name: osc-agent-ca
  secret:
    secretName: {{ .Values.server.caSecret.name }}
    defaultMode: 292
{{- end }}
{{- if .Values.fallbackBackup.secretName }}
- name: osc-agent-backup
  secret:
    secretName: {{ .Values.fallbackBackup.secretName }}
    defaultMode: 288
{{- end }}
{{- if eq .Values.output.mode "files" }}
- name: osc-agent-output
  emptyDir:
    {{- with .Values.output.medium }}
    medium: {{ . }}
    {{- end }}
    sizeLimit: {{ .Values.output.sizeLimit }}
{{- if .Values.templates }}
- name: osc-agent-templates
  configMap:
    name: {{ include "osc-agent.fullname" . }}-templates
{{- end }}
{{- else if .Values.output.appMountPath }}
{{- /* optional: the agent creates the object after the pod's volumes are set up; kubelet fills the
volume in on its next sync (about a minute). */}}
- name: osc-agent-output
  {{- if eq .Values.output.mode "secret" }}
  secret:
    secretName: {{ include "osc-agent.objectName" . }}
    defaultMode: 288
    optional: true
  {{- else }}
  configMap:
    name: {{ include "osc-agent.objectName" . }}
    defaultMode: 292
    optional: true
  {{- end }}
{{- end }}
{{- end -}}

{{/* The app container's volumeMounts of the agent's output: the shared directory (files mode), or the
Secret/ConfigMap volume at output.appMountPath. Empty otherwise. */}}
{{- define "osc-agent.appVolumeMounts" -}}
{{- if or (eq .Values.output.mode "files") .Values.output.appMountPath -}}
- name: osc-agent-output
  mountPath: {{ eq .Values.output.mode "files" | ternary .Values.output.mountPath .Values.output.appMountPath }}
  readOnly: true
{{- end -}}
{{- end -}}

{{/* The app container's envFrom of the produced Secret/ConfigMap (output.appEnvFrom). Empty otherwise.
The init container (or the native sidecar's startup probe) creates it before the app starts. */}}
{{- define "osc-agent.appEnvFrom" -}}
{{- if and .Values.output.appEnvFrom (has .Values.output.mode (list "configmap" "secret")) -}}
{{- if eq .Values.output.mode "secret" -}}
- secretRef:
    name: {{ include "osc-agent.objectName" . }}
{{- else -}}
- configMapRef:
    name: {{ include "osc-agent.objectName" . }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Pod annotations that roll the pods when what they read at start changes (the templates). */}}
{{- define "osc-agent.podAnnotations" -}}
{{- if and .Values.templates (eq .Values.output.mode "files") -}}
checksum/osc-agent-templates: {{ toJson .Values.templates | sha256sum }}
{{- end -}}
{{- end -}}

{{/* Least privilege for what the values ask for (README: "RBAC per mode"), as a list of Role rules. In
library use, pass "deploymentName" in the context for a rollout-restart action. */}}
{{- define "osc-agent.roleRules" -}}
{{- $types := include "osc-agent.actionTypes" . | fromJsonArray -}}
{{- $object := include "osc-agent.objectName" . -}}
{{- range $kind := list "configmap" "secret" }}
{{- if eq $.Values.output.mode $kind }}
- apiGroups: [""]
  resources: ["{{ $kind }}s"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["{{ $kind }}s"]
  resourceNames: [{{ $object | quote }}]
  verbs: ["get", "patch"]
{{- end }}
{{- end }}
{{- if or (not .Values.environment) .Values.output.ownerReference (has "rollout-restart" $types) }}
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get"]
- apiGroups: ["apps"]
  resources: ["replicasets"]
  verbs: ["get"]
{{- end }}
{{- if or .Values.output.ownerReference (has "rollout-restart" $types) }}
- apiGroups: ["apps"]
  resources: ["deployments"]
  {{- if has "rollout-restart" $types }}
  resourceNames: [{{ include "osc-agent.deploymentName" . | quote }}]
  verbs: ["get", "patch"]
  {{- else }}
  verbs: ["get"]
  {{- end }}
{{- end }}
{{- end -}}

{{/* "true" when the admin server is reachable from outside the pod (Service, monitors, helm test). */}}
{{- define "osc-agent.adminReachable" -}}
{{- if and (not (include "osc-agent.initOnly" .)) (not (hasPrefix "127." (.Values.admin.address | default "0.0.0.0"))) (ne (.Values.admin.address | default "") "::1") -}}
true
{{- end -}}
{{- end -}}

{{/* "true" when the chart renders a Service for the admin port. */}}
{{- define "osc-agent.serviceEnabled" -}}
{{- if and .Values.standalone.enabled (include "osc-agent.adminReachable" .) (or .Values.service.enabled .Values.serviceMonitor.enabled (and .Values.test.enabled (not .Values.test.url))) -}}
true
{{- end -}}
{{- end -}}

{{/* The injector's objects: "<fullname>-injector", with a name label of their own so that the standalone
Deployment's selector never matches the injector's pods. */}}
{{- define "osc-agent.injectorName" -}}
{{- printf "%s-injector" (include "osc-agent.fullname" . | trunc 54 | trimSuffix "-") -}}
{{- end -}}

{{- define "osc-agent.injectorSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-injector" (include "osc-agent.name" . | trunc 54 | trimSuffix "-") }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: injector
{{- end -}}

{{- define "osc-agent.injectorLabels" -}}
{{ include "osc-agent.injectorSelectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service | default "Helm" }}
app.kubernetes.io/version: {{ .Values.injector.image.tag | default .Values.image.tag | default (include "osc-agent.defaultTag" .) | quote }}
{{- with .Chart }}
helm.sh/chart: {{ printf "%s-%s" .Name .Version | replace "+" "_" }}
{{- end }}
{{- end -}}

{{/* The injector's image: injector.image, else the agent's (one binary does both). */}}
{{- define "osc-agent.injectorImage" -}}
{{- $repo := .Values.injector.image.repository | default .Values.image.repository -}}
{{- $tag := .Values.injector.image.tag | default .Values.image.tag | default (include "osc-agent.defaultTag" .) -}}
{{- printf "%s:%s" $repo (toString $tag) -}}
{{- end -}}

{{/* A LabelSelector (matchLabels, matchExpressions) as the string form of ?labelSelector=, for the
injector's audit to see what the webhook sees. */}}
{{- define "osc-agent.selectorString" -}}
{{- $parts := list -}}
{{- range $k, $v := (.matchLabels | default dict) -}}
{{- $parts = append $parts (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- range (.matchExpressions | default list) -}}
{{- if eq .operator "In" -}}{{- $parts = append $parts (printf "%s in (%s)" .key (join "," .values)) -}}
{{- else if eq .operator "NotIn" -}}{{- $parts = append $parts (printf "%s notin (%s)" .key (join "," .values)) -}}
{{- else if eq .operator "Exists" -}}{{- $parts = append $parts .key -}}
{{- else if eq .operator "DoesNotExist" -}}{{- $parts = append $parts (printf "!%s" .key) -}}
{{- else -}}{{- fail (printf "injector selectors: unknown operator %q (In, NotIn, Exists, DoesNotExist)" .operator) -}}
{{- end -}}
{{- end -}}
{{- join "," $parts -}}
{{- end -}}
