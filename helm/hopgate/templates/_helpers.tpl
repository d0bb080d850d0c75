{{- define "hopgate.name" -}}{{ .Release.Name }}-hopgate{{- end -}}
{{- define "hopgate.labels" -}}
app.kubernetes.io/name: hopgate
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "hopgate.selector" -}}
app.kubernetes.io/name: hopgate
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "hopgate.restricted" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
