"""A JSON Schema of the KubeRay `ray.io/v1` RayCluster and RayJob fields the manifests in cluster/kuberay use.

No KubeRay CRD ships with any installed package, so the required and allowed fields were taken by hand
from KubeRay's Go types (github.com/ray-project/kuberay, master as of 2026:
`ray-operator/apis/ray/v1/raycluster_types.go` — RayClusterSpec, AuthOptions, AutoscalerOptions,
HeadGroupSpec, WorkerGroupSpec; `ray-operator/apis/ray/v1/rayjob_types.go` — RayJobSpec). A field is
required where its json tag has no `omitempty` and no `+optional` marker; enums come from the
`+kubebuilder:validation:Enum` markers. KubeRay-owned objects reject unknown keys (a misspelt
`workerGroupSpec` fails), and the parts of Kubernetes' core/v1 PodTemplateSpec the operator reads
(containers, resources, tolerations, volumes) are checked against the k8s field names.
"""

from __future__ import annotations

from typing import Any

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_QUANTITY = {"type": ["string", "integer"]}
_INT = {"type": "integer"}

# -- Kubernetes core/v1 (the parts the operator and the autoscaler read) -------------------------------
_RESOURCES = {
    "type": "object", "additionalProperties": False,
    "properties": {"limits": {"type": "object", "additionalProperties": _QUANTITY},
                   "requests": {"type": "object", "additionalProperties": _QUANTITY},
                   "claims": {"type": "array"}},
}
_CONTAINER = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {k: {} for k in (
        "args", "command", "env", "envFrom", "imagePullPolicy", "lifecycle", "livenessProbe", "ports",
        "readinessProbe", "resizePolicy", "restartPolicy", "securityContext", "startupProbe", "stdin",
        "stdinOnce", "terminationMessagePath", "terminationMessagePolicy", "tty", "volumeDevices",
        "volumeMounts", "workingDir")} | {
        "name": {"type": "string"}, "image": {"type": "string"}, "resources": _RESOURCES,
        "env": {"type": "array", "items": {"type": "object", "required": ["name"],
                                           "properties": {"name": {"type": "string"}, "value": {"type": "string"},
                                                          "valueFrom": {"type": "object"}},
                                           "additionalProperties": False}},
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
        "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}},
    },
}
_TOLERATION = {
    "type": "object", "additionalProperties": False,
    "properties": {"key": {"type": "string"}, "operator": {"enum": ["Exists", "Equal"]}, "value": {"type": "string"},
                   "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
                   "tolerationSeconds": _INT},
}
_VOLUME = {
    "type": "object", "required": ["name"],
    "properties": {"name": {"type": "string"},
                   "emptyDir": {"type": "object", "additionalProperties": False,
                                "properties": {"medium": {"enum": ["", "Memory"]}, "sizeLimit": _QUANTITY}}},
}
_POD_SPEC = {
    "type": "object", "required": ["containers"], "additionalProperties": False,
    "properties": {k: {} for k in (
        "activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "dnsConfig", "dnsPolicy",
        "enableServiceLinks", "ephemeralContainers", "hostAliases", "hostIPC", "hostNetwork", "hostPID",
        "hostUsers", "hostname", "imagePullSecrets", "initContainers", "nodeName", "os", "overhead",
        "preemptionPolicy", "priority", "priorityClassName", "readinessGates", "resourceClaims", "resources",
        "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates", "securityContext",
        "serviceAccount", "serviceAccountName", "setHostnameAsFQDN", "shareProcessNamespace", "subdomain",
        "terminationGracePeriodSeconds", "topologySpreadConstraints")} | {
        "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
        "nodeSelector": _STRING_MAP,
        "tolerations": {"type": "array", "items": _TOLERATION},
        "volumes": {"type": "array", "items": _VOLUME},
    },
}
_POD_TEMPLATE = {
    "type": "object", "required": ["spec"], "additionalProperties": False,
    "properties": {"metadata": {"type": "object"}, "spec": _POD_SPEC},
}

# -- ray.io/v1 RayCluster (raycluster_types.go) ------------------------------------------------------
_AUTH_OPTIONS = {
    "type": "object", "additionalProperties": False,
    "properties": {"mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"},
                   "enableK8sTokenAuth": {"type": "boolean"}},
}
_AUTOSCALER_OPTIONS = {
    "type": "object", "additionalProperties": False,
    "properties": {k: {} for k in ("resources", "image", "imagePullPolicy", "securityContext", "env", "envFrom",
                                   "volumeMounts", "command", "args")} | {
        "idleTimeoutSeconds": _INT, "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "version": {"enum": ["v1", "v2"]}},
}
_HEAD_GROUP = {
    "type": "object", "required": ["template"], "additionalProperties": False,
    "properties": {"template": _POD_TEMPLATE, "headService": {"type": "object"}, "enableIngress": {"type": "boolean"},
                   "ingressOptions": {"type": "object"}, "resources": _STRING_MAP, "labels": _STRING_MAP,
                   "rayStartParams": _STRING_MAP, "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}},
}
_WORKER_GROUP = {
    "type": "object", "required": ["groupName", "minReplicas", "maxReplicas", "template"], "additionalProperties": False,
    "properties": {"suspend": {"type": "boolean"}, "groupName": {"type": "string"}, "replicas": _INT,
                   "minReplicas": _INT, "maxReplicas": _INT, "idleTimeoutSeconds": _INT, "priority": _INT,
                   "resources": _STRING_MAP, "labels": _STRING_MAP, "rayStartParams": _STRING_MAP,
                   "template": _POD_TEMPLATE, "scaleStrategy": {"type": "object"}, "numOfHosts": _INT},
}
RAY_CLUSTER_SPEC: dict[str, Any] = {
    "type": "object", "required": ["headGroupSpec"], "additionalProperties": False,
    "properties": {"upgradeStrategy": {"type": "object"}, "authOptions": _AUTH_OPTIONS, "suspend": {"type": "boolean"},
                   "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
                   "autoscalerOptions": _AUTOSCALER_OPTIONS, "headServiceAnnotations": _STRING_MAP,
                   "enableInTreeAutoscaling": {"type": "boolean"}, "gcsFaultToleranceOptions": {"type": "object"},
                   "historyServerOptions": {"type": "object"}, "networkPolicy": {"type": "object"},
                   "tlsOptions": {"type": "object"}, "headGroupSpec": _HEAD_GROUP, "rayVersion": {"type": "string"},
                   "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP}},
}
_METADATA = {"type": "object", "required": ["name"],
             "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}}}
RAY_CLUSTER: dict[str, Any] = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayCluster"}, "metadata": _METADATA,
                   "spec": RAY_CLUSTER_SPEC},
}

# -- ray.io/v1 RayJob (rayjob_types.go) ---------------------------------------------------------------
RAY_JOB: dict[str, Any] = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": _METADATA,
        "spec": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1}, "backoffLimit": _INT,
                "rayClusterSpec": RAY_CLUSTER_SPEC, "submitterPodTemplate": _POD_TEMPLATE, "metadata": _STRING_MAP,
                "clusterSelector": _STRING_MAP, "submitterConfig": {"type": "object"},
                "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
                "deletionStrategy": {"type": "object"}, "entrypoint": {"type": "string"},
                "runtimeEnvYAML": {"type": "string"}, "jobId": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "entrypointResources": {"type": "string"}, "entrypointNumCpus": {"type": "number"},
                "entrypointNumGpus": {"type": "number"}, "ttlSecondsAfterFinished": _INT,
                "shutdownAfterJobFinishes": {"type": "boolean"}, "suspend": {"type": "boolean"},
            },
        },
    },
}

SCHEMAS: dict[str, dict[str, Any]] = {"RayCluster": RAY_CLUSTER, "RayJob": RAY_JOB}
