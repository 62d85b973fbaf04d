{{/*
Names and labels. Kubernetes names are at most 63 characters (a DNS label) and some objects
append a suffix ("-operator", "-access-log"), so the base name is cut at 52.
*/}}
{{- define "billingproxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 52 | trimSuffix "-" }}
{{- end }}

{{- define "billingproxy.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else if contains (include "billingproxy.name" .) .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "billingproxy.name" .) | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "billingproxy.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "billingproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: include with (dict "root" $ "component" "gateway"). */}}
{{- define "billingproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "billingproxy.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "billingproxy.image" -}}
{{- $repository := required "image.repository is required: where you pushed the project image (make image), e.g. registry.example/billingproxy" .Values.image.repository }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "billingproxy.serviceAccountName" -}}
{{- printf "%s-%s" (include "billingproxy.fullname" .root) .component }}
{{- end }}

{{/* Secret names and keys: the chart's own Secret, or the existingSecret a value names. */}}
{{- define "billingproxy.databaseSecret" -}}
{{- default (printf "%s-database" (include "billingproxy.fullname" .)) .Values.database.existingSecret }}
{{- end }}
{{- define "billingproxy.backendSecret" -}}
{{- default (printf "%s-backend" (include "billingproxy.fullname" .)) .Values.backend.existingSecret }}
{{- end }}
{{- define "billingproxy.stripeSecret" -}}
{{- default (printf "%s-stripe" (include "billingproxy.fullname" .)) .Values.stripe.existingSecret }}
{{- end }}
{{- define "billingproxy.smtpSecret" -}}
{{- default (printf "%s-smtp" (include "billingproxy.fullname" .)) .Values.smtp.existingSecret }}
{{- end }}
{{- define "billingproxy.smtpEnabled" -}}
{{- if or .Values.smtp.existingSecret .Values.smtp.url }}true{{ end }}
{{- end }}
{{- define "billingproxy.accessLogSecret" -}}
{{- default (printf "%s-access-log" (include "billingproxy.fullname" .)) .Values.gateway.accessLogSecret.existingSecret }}
{{- end }}
{{- define "billingproxy.stripeEnabled" -}}
{{- if or .Values.stripe.existingSecret .Values.stripe.secretKey }}true{{ end }}
{{- end }}
{{- define "billingproxy.backendKeyEnabled" -}}
{{- if or .Values.backend.existingSecret .Values.backend.apiKey }}true{{ end }}
{{- end }}

{{- define "billingproxy.dataDir" -}}/var/lib/billingproxy{{- end }}
{{- define "billingproxy.pricesDir" -}}/etc/billingproxy/prices{{- end }}

{{- define "billingproxy.databaseEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "billingproxy.databaseSecret" . }}
      key: {{ .Values.database.existingSecretKey }}
{{- end }}

{{/*
The settings every billingproxy process of the gateway reads (billing/settings.py). The sidecar
and the init container that renders Envoy's configuration both include this one list, so Envoy
is configured from exactly what the sidecar serves (docs/decisions/0021-...).
*/}}
{{- define "billingproxy.settingsEnv" -}}
- name: BILLINGPROXY_DATA_DIR
  value: {{ include "billingproxy.dataDir" . | quote }}
- name: SSL_CERT_FILE
  value: /etc/ssl/certs/ca-certificates.crt
- name: BILLINGPROXY_BIND_HOST
  value: "0.0.0.0"
- name: BILLINGPROXY_GATEWAY_PORT
  value: {{ .Values.gateway.port | quote }}
- name: BILLINGPROXY_METRICS_PORT
  value: {{ .Values.metrics.port | quote }}
{{- with .Values.gateway.publicUrl }}
- name: BILLINGPROXY_PUBLIC_URL
  value: {{ . | quote }}
{{- end }}
- name: BILLINGPROXY_BACKEND_URL
  value: {{ .Values.backend.url | quote }}
{{- if include "billingproxy.backendKeyEnabled" . }}
- name: BILLINGPROXY_BACKEND_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "billingproxy.backendSecret" . }}
      key: {{ .Values.backend.existingSecretKey }}
{{- end }}
- name: BILLINGPROXY_ACCESS_LOG_ROTATE_BYTES
  value: {{ .Values.gateway.accessLog.rotateBytes | int64 | quote }}
- name: BILLINGPROXY_ACCESS_LOG_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "billingproxy.accessLogSecret" . }}
      key: {{ .Values.gateway.accessLogSecret.existingSecretKey }}
{{- if .Values.pricing.overrides }}
- name: BILLINGPROXY_PRICE_OVERRIDES
  value: {{ printf "%s/overrides.yaml" (include "billingproxy.pricesDir" .) | quote }}
{{- end }}
{{- include "billingproxy.stripeEnv" . }}
{{- if include "billingproxy.smtpEnabled" . }}
{{- if not .Values.smtp.from }}
{{- fail "smtp.from must be set with smtp.url or smtp.existingSecret: the From of alert mail" }}
{{- end }}
- name: BILLINGPROXY_SMTP_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "billingproxy.smtpSecret" . }}
      key: {{ .Values.smtp.existingSecretKey }}
- name: BILLINGPROXY_SMTP_FROM
  value: {{ .Values.smtp.from | quote }}
{{- end }}
{{- if and (or .Values.ingress.enabled .Values.httpRoute.enabled) (not (hasKey .Values.settings "TRUSTED_PROXY_HOPS")) }}
# Behind the chart's Ingress or HTTPRoute, the client's address is the one its proxy appends to
# X-Forwarded-For (the per-address signup limit); settings.TRUSTED_PROXY_HOPS overrides it.
- name: BILLINGPROXY_TRUSTED_PROXY_HOPS
  value: "1"
{{- end }}
{{- range $name, $value := .Values.settings }}
- name: {{ printf "BILLINGPROXY_%s" $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{- define "billingproxy.stripeEnv" -}}
{{- if include "billingproxy.stripeEnabled" . }}
- name: STRIPE_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "billingproxy.stripeSecret" . }}
      key: {{ .Values.stripe.existingSecretKeys.secretKey }}
- name: STRIPE_WEBHOOK_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "billingproxy.stripeSecret" . }}
      key: {{ .Values.stripe.existingSecretKeys.webhookSecret }}
{{- end }}
{{- end }}

{{/* The restricted Pod Security Standard, for every pod and container of the chart. */}}
{{- define "billingproxy.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}
{{- define "billingproxy.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* What rolls the pods when it changes: the settings and the chart's own Secrets. */}}
{{- define "billingproxy.checksums" -}}
checksum/config: {{ dict "settings" .Values.settings "backend" .Values.backend.url "gateway" .Values.gateway.port "publicUrl" .Values.gateway.publicUrl "pricing" .Values.pricing "stripe" (include "billingproxy.stripeEnabled" .) "smtpFrom" .Values.smtp.from | toJson | sha256sum }}
checksum/secret: {{ dict "database" .Values.database "backend" .Values.backend "stripe" .Values.stripe "smtp" .Values.smtp.url "accessLog" .Values.gateway.accessLogSecret | toJson | sha256sum }}
{{- end }}

{{/* The volumes the project image's containers in the gateway pod mount. */}}
{{- define "billingproxy.gatewayMounts" -}}
- name: run
  mountPath: {{ include "billingproxy.dataDir" . }}/run
- name: access-log
  mountPath: {{ include "billingproxy.dataDir" . }}/access-log
- name: tmp
  mountPath: /tmp
{{- if .Values.pricing.overrides }}
- name: prices
  mountPath: {{ include "billingproxy.pricesDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
Egress rules: DNS, then each target of each target list: a port and either an address block
({cidr, port}) or pods by label ({podSelector, namespaceSelector, port}; values.schema.json allows
one of the two shapes).
*/}}
{{- define "billingproxy.egressRules" -}}
- ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
{{- range $targets := .targets }}
{{- range $targets }}
- to:
    {{- if .cidr }}
    - ipBlock:
        cidr: {{ .cidr }}
    {{- else }}
    - {{ toYaml (pick . "podSelector" "namespaceSelector") | nindent 6 | trim }}
    {{- end }}
  ports:
    - {port: {{ .port }}, protocol: TCP}
{{- end }}
{{- end }}
{{- end }}
