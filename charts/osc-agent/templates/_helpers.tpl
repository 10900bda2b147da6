{{/*
Helpers of the osc-agent chart. The templates "osc-agent.sidecar", "osc-agent.initContainer" and
"osc-agent.volumes" take a context with .Values (this chart's values), .Release and optionally .Chart, so
another chart can include them for its own pods:
  {{ include "osc-agent.sidecar" (dict "Values" (index .Values "osc-agent") "Release" .Release) | nindent 8 }}
*/}}

{{- define "osc-agent.fullname" -}}
{{- if contains "osc-agent" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-osc-agent" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "osc-agent.labels" -}}
app.kubernetes.io/name: osc-agent
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service | default "Helm" }}
{{- with .Chart }}
helm.sh/chart: {{ printf "%s-%s" .Name .Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .AppVersion | quote }}
{{- end }}
{{- end -}}

{{- define "osc-agent.selectorLabels" -}}
app.kubernetes.io/name: osc-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "osc-agent.image" -}}
{{- $tag := .Values.image.tag | default (and .Chart .Chart.AppVersion) | default "latest" -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
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

{{- define "osc-agent.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "osc-agent.fullname" .) -}}
{{- end -}}

{{- define "osc-agent.credentialsSecret" -}}
{{- .Values.credentials.existingSecret | default (printf "%s-credentials" (include "osc-agent.fullname" .)) -}}
{{- end -}}

{{- define "osc-agent.objectName" -}}
{{- .Values.output.objectName | default (include "osc-agent.fullname" .) -}}
{{- end -}}

{{/* One action as the --action flag's TYPE:key=value,... form. */}}
{{- define "osc-agent.actionArg" -}}
{{- $fields := list -}}
{{- range $k, $v := omit . "type" -}}
{{- if kindIs "slice" $v -}}{{- $v = join " " $v -}}{{- end -}}
{{- $fields = append $fields (printf "%s=%v" $k $v) -}}
{{- end -}}
{{- .type -}}{{- if $fields -}}:{{- join "," $fields -}}{{- end -}}
{{- end -}}

{{/* The agent's flags shared by the init container and the sidecar. */}}
{{- define "osc-agent.args" -}}
{{- $v := .Values -}}
- --server={{ required "server.url is required" $v.server.url }}
{{- with $v.environment }}
- --environment={{ . }}
{{- end }}
- --user-key-file=/var/run/secrets/osc-agent/{{ required "credentials.userKeyKey is required" $v.credentials.userKeyKey }}
{{- with $v.credentials.apiKeyKey }}
- --api-key-file=/var/run/secrets/osc-agent/{{ . }}
{{- end }}
{{- with $v.credentials.tokenKey }}
- --token-file=/var/run/secrets/osc-agent/{{ . }}
{{- end }}
{{- if $v.server.caSecret.name }}
- --ca-file=/var/run/secrets/osc-agent-ca/{{ $v.server.caSecret.key }}
{{- end }}
{{- if $v.server.insecureSkipTlsVerify }}
- --insecure-skip-tls-verify
{{- end }}
{{- range $v.selection.include }}
- --include={{ . }}
{{- end }}
{{- range $v.selection.exclude }}
- --exclude={{ . }}
{{- end }}
{{- range $v.selection.categories }}
- --category={{ . }}
{{- end }}
{{- if eq $v.output.mode "files" }}
- --output-dir={{ $v.output.mountPath }}
- --file-mode={{ $v.output.fileMode }}
- --value-format={{ $v.output.valueFormat }}
{{- range $v.output.aggregates }}
- --output={{ $v.output.mountPath }}/{{ .name }}:{{ .format }}
{{- end }}
{{- range $name, $_ := $v.templates }}
- --template=/etc/osc-agent/templates/{{ $name }}:{{ $v.output.mountPath }}/{{ $name }}
{{- end }}
{{- else if eq $v.output.mode "configmap" }}
- --configmap={{ include "osc-agent.objectName" . }}
{{- else if eq $v.output.mode "secret" }}
- --secret={{ include "osc-agent.objectName" . }}
{{- else }}
{{- fail (printf "output.mode must be files, configmap or secret, not %q" $v.output.mode) }}
{{- end }}
{{- if $v.output.forceConflicts }}
- --force-conflicts
{{- end }}
{{- if $v.output.ownerReference }}
- --owner-reference
{{- end }}
- --log-format={{ $v.logFormat }}
{{- range $v.extraArgs }}
- {{ . }}
{{- end }}
{{- end -}}

{{/* Flags only the long-running sidecar takes: actions (never in the --once init container, where the
app is not running yet) and the admin server. */}}
{{- define "osc-agent.sidecarArgs" -}}
{{- $v := .Values -}}
{{- range $v.actions }}
- --action={{ include "osc-agent.actionArg" . }}
{{- end }}
{{- if $v.actions }}
- --act-on-start={{ $v.actOnStart }}
- --action-cooldown={{ $v.actionCooldown }}
- --max-actions={{ $v.maxActions }}
- --action-window={{ $v.actionWindow }}
{{- end }}
- --admin-addr={{ $v.admin.address | default "0.0.0.0" }}:{{ $v.admin.port }}
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

{{/* The long-running agent container. */}}
{{- define "osc-agent.sidecar" -}}
- name: osc-agent
  image: {{ include "osc-agent.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    {{- include "osc-agent.args" . | nindent 4 }}
    {{- include "osc-agent.sidecarArgs" . | nindent 4 }}
  env:
    {{- include "osc-agent.env" . | nindent 4 }}
  ports:
    - name: admin
      containerPort: {{ .Values.admin.port }}
      protocol: TCP
  livenessProbe:
    {{- toYaml .Values.livenessProbe | nindent 4 }}
  readinessProbe:
    {{- toYaml .Values.readinessProbe | nindent 4 }}
  {{- if .Values.nativeSidecar }}
  startupProbe:
    {{- toYaml .Values.startupProbe | nindent 4 }}
  restartPolicy: Always
  {{- end }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- include "osc-agent.securityContext" . | nindent 4 }}
  volumeMounts:
    {{- include "osc-agent.mounts" . | nindent 4 }}
{{- end -}}

{{/* The --once init container: the app starts with its files present. */}}
{{- define "osc-agent.initContainer" -}}
- name: osc-agent-init
  image: {{ include "osc-agent.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - --once
    {{- include "osc-agent.args" . | nindent 4 }}
  env:
    {{- include "osc-agent.env" . | nindent 4 }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    {{- include "osc-agent.mounts" . | nindent 4 }}
{{- end -}}

{{- define "osc-agent.volumes" -}}
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
{{- end }}
{{- end -}}
