//! The workers: a StatefulSet with one PVC per worker, its headless Service and a
//! PodDisruptionBudget.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Affinity, AppArmorProfile, Capabilities, ConfigMapVolumeSource, Container, ContainerPort,
    EnvVar, HTTPGetAction, KeyToPath, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PodAffinityTerm, PodAntiAffinity, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    config_map_name, worker_statefulset_name, workers_service_name, Context, CONFIG_DIR,
    CONFIG_FILE, GRPC_PORT, METRICS_PORT, STATE_DIR, TLS_DIR,
};

const COMPONENT: &str = "worker";
/// Where registry credentials (a docker config.json) are mounted.
const DOCKER_CONFIG_DIR: &str = "/etc/kiln/registry";
/// Seconds a worker gets to finish running builds after the gateway drained it.
const TERMINATION_GRACE_SECONDS: i64 = 300;

pub(super) fn stateful_set(ctx: &Context<'_>) -> StatefulSet {
    let spec = &ctx.pool.spec;
    let mut args = vec![
        format!("--addr=tcp://0.0.0.0:{GRPC_PORT}"),
        format!("--root={STATE_DIR}"),
        format!("--oci-runtime={}", spec.runtime.as_str()),
        format!("--metrics-addr=0.0.0.0:{METRICS_PORT}"),
        format!("--tlscacert={TLS_DIR}/ca.crt"),
        format!("--tlscert={TLS_DIR}/tls.crt"),
        format!("--tlskey={TLS_DIR}/tls.key"),
        format!("--config={CONFIG_DIR}/{CONFIG_FILE}"),
    ];
    if let Some(n) = spec.max_parallelism {
        args.push(format!("--max-parallelism={n}"));
    }
    if let Some(cache) = &spec.cache {
        args.push(format!("--cache-registry={}", cache.registry));
    }
    if spec.rootless {
        args.push("--rootless".to_string());
    }

    let mut mounts = vec![
        VolumeMount {
            name: "state".into(),
            mount_path: STATE_DIR.into(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tls".into(),
            mount_path: TLS_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        // A directory, not a subPath: subPath mounts never see ConfigMap updates, and GC policy
        // changes must reach the worker without a restart.
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(ctx.server_secret()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map_name(&ctx.name),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    let mut env = vec![EnvVar {
        name: "KILN_LOG".into(),
        value: Some("info".into()),
        ..EnvVar::default()
    }];
    if let Some(secret) = spec
        .cache
        .as_ref()
        .and_then(|c| c.credentials_secret.clone())
    {
        volumes.push(Volume {
            name: "registry-auth".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret),
                items: Some(vec![KeyToPath {
                    key: ".dockerconfigjson".into(),
                    path: "config.json".into(),
                    ..KeyToPath::default()
                }]),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "registry-auth".into(),
            mount_path: DOCKER_CONFIG_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        env.push(EnvVar {
            name: "DOCKER_CONFIG".into(),
            value: Some(DOCKER_CONFIG_DIR.into()),
            ..EnvVar::default()
        });
    }
    let container = Container {
        name: "worker".into(),
        image: Some(spec.image.clone()),
        image_pull_policy: ctx.pull_policy(),
        command: Some(vec!["kiln-worker".into()]),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some("grpc".into()),
                container_port: GRPC_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: METRICS_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        liveness_probe: Some(http_probe("/healthz", 20, 6)),
        resources: spec.resources.clone(),
        security_context: Some(security_context(spec.rootless)),
        volume_mounts: Some(mounts),
        ..Container::default()
    };

    let selector = ctx.selector(COMPONENT);
    let pod = PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        affinity: Some(anti_affinity(selector.clone())),
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        enable_service_links: Some(false),
        ..PodSpec::default()
    };

    let mut requests = BTreeMap::new();
    requests.insert("storage".to_string(), Quantity(spec.storage.size.clone()));
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("state".into()),
            labels: Some(ctx.labels(COMPONENT)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(requests),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };

    StatefulSet {
        metadata: ctx.meta(worker_statefulset_name(&ctx.name), COMPONENT),
        spec: Some(StatefulSetSpec {
            replicas: Some(spec.replicas),
            service_name: Some(workers_service_name(&ctx.name)),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(ctx.labels(COMPONENT)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            volume_claim_templates: Some(vec![claim]),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

/// An HTTP probe on the metrics port.
pub(super) fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            scheme: Some("HTTP".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(3),
        ..Probe::default()
    }
}

/// Privileged, as runc needs to create namespaces and mount overlayfs; rootless runs as an
/// unprivileged user with the seccomp and AppArmor profiles user namespaces need.
fn security_context(rootless: bool) -> SecurityContext {
    if rootless {
        SecurityContext {
            run_as_user: Some(1000),
            run_as_group: Some(1000),
            run_as_non_root: Some(true),
            seccomp_profile: Some(SeccompProfile {
                type_: "Unconfined".into(),
                ..SeccompProfile::default()
            }),
            app_armor_profile: Some(AppArmorProfile {
                type_: "Unconfined".into(),
                ..AppArmorProfile::default()
            }),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }
    } else {
        SecurityContext {
            privileged: Some(true),
            ..SecurityContext::default()
        }
    }
}

/// Prefer spreading pods over nodes; preferred, not required, so a one-node cluster works.
pub(super) fn anti_affinity(selector: BTreeMap<String, String>) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(LabelSelector {
                            match_labels: Some(selector),
                            ..LabelSelector::default()
                        }),
                        topology_key: "kubernetes.io/hostname".into(),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    }
}

pub(super) fn headless_service(ctx: &Context<'_>) -> Service {
    Service {
        metadata: ctx.meta(workers_service_name(&ctx.name), COMPONENT),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(ctx.selector(COMPONENT)),
            publish_not_ready_addresses: Some(false),
            ports: Some(vec![
                ServicePort {
                    name: Some("grpc".into()),
                    port: GRPC_PORT,
                    target_port: Some(IntOrString::String("grpc".into())),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                },
                ServicePort {
                    name: Some("metrics".into()),
                    port: METRICS_PORT,
                    target_port: Some(IntOrString::String("metrics".into())),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                },
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

pub(super) fn pdb(ctx: &Context<'_>) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: ctx.meta(workers_service_name(&ctx.name), COMPONENT),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(ctx.selector(COMPONENT)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}
