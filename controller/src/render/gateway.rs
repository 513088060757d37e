//! The gateway: a Deployment running `kiln-gateway`, which finds the workers by watching the
//! EndpointSlices of their headless Service (so a terminating worker pod is drained before
//! it goes), the ServiceAccount, Role and RoleBinding that let it read them, and the Service
//! clients reach it through.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, PodSecurityContext, PodSpec, PodTemplateSpec,
    SeccompProfile, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume,
    VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::worker::{anti_affinity, http_probe};
use super::{
    gateway_name, workers_service_name, Context, ADMIN_PORT, CLIENT_TLS_DIR, GRPC_PORT,
    METRICS_PORT, TLS_DIR,
};
use crate::{Error, Result};

const COMPONENT: &str = "gateway";

pub(super) fn deployment(ctx: &Context<'_>) -> Result<Deployment> {
    let gw = &ctx.pool.spec.gateway;
    let bound: f64 = gw.load_bound.parse().unwrap_or(0.0);
    if bound <= 1.0 {
        return Err(Error::InvalidSpec {
            object: format!("{}/{}", ctx.namespace, ctx.name),
            field: "spec.gateway.loadBound".into(),
            reason: format!("{:?} must be a number above 1", gw.load_bound),
        });
    }
    let mut args = vec![
        format!("--addr=tcp://0.0.0.0:{GRPC_PORT}"),
        format!(
            "--workers-endpointslice={}/{}",
            ctx.namespace,
            workers_service_name(&ctx.name)
        ),
        format!("--load-bound={}", gw.load_bound),
        format!("--metrics-addr=0.0.0.0:{METRICS_PORT}"),
        // Off loopback the gateway serves it only over mutual TLS (the flags below).
        format!("--admin-addr=0.0.0.0:{ADMIN_PORT}"),
        format!("--tlscacert={TLS_DIR}/ca.crt"),
        format!("--tlscert={TLS_DIR}/tls.crt"),
        format!("--tlskey={TLS_DIR}/tls.key"),
        format!("--worker-tlscert={CLIENT_TLS_DIR}/tls.crt"),
        format!("--worker-tlskey={CLIENT_TLS_DIR}/tls.key"),
    ];
    if let Some(t) = gw.threads {
        args.push(format!("--threads={t}"));
    }
    let container = Container {
        name: "gateway".into(),
        image: Some(gw.image.clone()),
        image_pull_policy: ctx.pull_policy(),
        command: Some(vec!["kiln-gateway".into()]),
        args: Some(args),
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
            ContainerPort {
                name: Some("admin".into()),
                container_port: ADMIN_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        liveness_probe: Some(http_probe("/healthz", 20, 6)),
        resources: gw.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "tls".into(),
                mount_path: TLS_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "client-tls".into(),
                mount_path: CLIENT_TLS_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let secret_volume = |name: &str, secret: String| Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    };
    let selector = ctx.selector(COMPONENT);
    Ok(Deployment {
        metadata: ctx.meta(gateway_name(&ctx.name), COMPONENT),
        spec: Some(DeploymentSpec {
            replicas: Some(gw.replicas),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(ctx.labels(COMPONENT)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(vec![
                        secret_volume("tls", ctx.server_secret()),
                        secret_volume("client-tls", ctx.gateway_client_secret()),
                    ]),
                    affinity: Some(anti_affinity(selector)),
                    // Its token reads the workers' EndpointSlices (see `role`).
                    service_account_name: Some(gateway_name(&ctx.name)),
                    automount_service_account_token: Some(true),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    enable_service_links: Some(false),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    })
}

pub(super) fn service(ctx: &Context<'_>) -> Service {
    let gw = &ctx.pool.spec.gateway;
    Service {
        metadata: ctx.meta(gateway_name(&ctx.name), COMPONENT),
        spec: Some(ServiceSpec {
            type_: Some(gw.service_type.as_str().into()),
            selector: Some(ctx.selector(COMPONENT)),
            ports: Some(vec![
                ServicePort {
                    name: Some("grpc".into()),
                    port: gw.port,
                    target_port: Some(IntOrString::String("grpc".into())),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                },
                ServicePort {
                    name: Some("admin".into()),
                    port: ADMIN_PORT,
                    target_port: Some(IntOrString::String("admin".into())),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                },
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The gateway's identity in the API server.
pub(super) fn service_account(ctx: &Context<'_>) -> ServiceAccount {
    ServiceAccount {
        metadata: ctx.meta(gateway_name(&ctx.name), COMPONENT),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

/// Read access to the EndpointSlices of the pool's namespace, and nothing else.
pub(super) fn role(ctx: &Context<'_>) -> Role {
    Role {
        metadata: ctx.meta(gateway_name(&ctx.name), COMPONENT),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["discovery.k8s.io".into()]),
            resources: Some(vec!["endpointslices".into()]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..PolicyRule::default()
        }]),
    }
}

/// Grants [`role`] to [`service_account`].
pub(super) fn role_binding(ctx: &Context<'_>) -> RoleBinding {
    RoleBinding {
        metadata: ctx.meta(gateway_name(&ctx.name), COMPONENT),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: gateway_name(&ctx.name),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: gateway_name(&ctx.name),
            namespace: Some(ctx.namespace.clone()),
            ..Subject::default()
        }]),
    }
}
