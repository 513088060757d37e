//! The worker ConfigMap: `worker.toml` holding the pool's GC policy (BuildKit's GC settings,
//! under the kebab-case keys of the worker's `--config` file), with sizes and durations
//! validated and written canonically.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

use super::{config_map_name, Context, CONFIG_FILE};
use crate::crd::GcPolicy;
use crate::Result;
use kiln_proto::gc::{parse_limits, Filter, Policy, Rule};

pub(super) fn config_map(ctx: &Context<'_>) -> Result<ConfigMap> {
    let toml = worker_config_toml(&ctx.pool.spec.gc)?;
    Ok(ConfigMap {
        metadata: ctx.meta(config_map_name(&ctx.name), "worker"),
        data: Some(BTreeMap::from([(CONFIG_FILE.to_string(), toml)])),
        ..ConfigMap::default()
    })
}

/// Renders the worker configuration file for a GC policy. Absolute sizes become plain bytes,
/// percentages stay `N%`, durations become whole seconds (`172800s`): forms BuildKit accepts.
/// Fails naming the field when a size or duration does not parse. A default policy writes no
/// `[gc]` table at all, leaving the worker's own defaults in force.
pub fn worker_config_toml(gc: &GcPolicy) -> Result<String> {
    let mut out = String::from(
        "# Written by kiln-controller from the BuildWorkerPool's spec.gc; do not edit.\n\
         # Sizes are bytes or a percentage of the disk; durations are seconds.\n",
    );
    if *gc == GcPolicy::default() {
        return Ok(out);
    }
    out.push_str(&policy(gc)?.to_toml());
    Ok(out)
}

/// The spec's policy in the shared form the worker reads; errors name the spec field.
pub fn policy(gc: &GcPolicy) -> Result<Policy> {
    const NAMES: [&str; 4] = [
        "keepDuration",
        "reservedSpace",
        "maxUsedSpace",
        "minFreeSpace",
    ];
    let limits = parse_limits(
        "spec.gc",
        NAMES,
        [
            gc.keep_duration.as_deref(),
            gc.reserved_space.as_deref(),
            gc.max_used_space.as_deref(),
            gc.min_free_space.as_deref(),
        ],
    )?;
    let mut rules = Vec::with_capacity(gc.rules.len());
    for (i, rule) in gc.rules.iter().enumerate() {
        for f in &rule.filters {
            Filter::parse(f, &format!("spec.gc.rules[{i}].filters"))?;
        }
        rules.push(Rule {
            all: rule.all,
            filters: rule.filters.clone(),
            limits: parse_limits(
                &format!("spec.gc.rules[{i}]"),
                NAMES,
                [
                    rule.keep_duration.as_deref(),
                    rule.reserved_space.as_deref(),
                    rule.max_used_space.as_deref(),
                    rule.min_free_space.as_deref(),
                ],
            )?,
        });
    }
    Ok(Policy {
        enabled: !gc.disabled,
        interval: None,
        limits,
        rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::GcRule;

    #[test]
    fn policy_is_canonical() {
        let gc = GcPolicy {
            reserved_space: Some("10GB".into()),
            max_used_space: Some("80%".into()),
            keep_duration: Some("2d".into()),
            rules: vec![GcRule {
                filters: vec![
                    "type==source.local".into(),
                    "description==say \"hi\"".into(),
                ],
                keep_duration: Some("48h".into()),
                max_used_space: Some("512Mi".into()),
                ..GcRule::default()
            }],
            ..GcPolicy::default()
        };
        let toml = worker_config_toml(&gc).unwrap();
        assert!(toml.contains("enabled = true\n"), "{toml}");
        assert!(
            toml.contains("reserved-space = \"10737418240\"\n"),
            "{toml}"
        );
        assert!(toml.contains("max-used-space = \"80%\"\n"), "{toml}");
        assert!(toml.contains("keep-duration = \"172800s\"\n"), "{toml}");
        assert!(
            toml.contains("[[gc.rules]]\nall = false\nfilters = [\"type==source.local\", \"description==say \\\"hi\\\"\"]\nkeep-duration = \"172800s\"\nmax-used-space = \"536870912\"\n"),
            "{toml}"
        );
    }

    #[test]
    fn default_policy_writes_no_table() {
        let toml = worker_config_toml(&GcPolicy::default()).unwrap();
        let v: toml::Value = toml::from_str(&toml).unwrap();
        assert_eq!(v.as_table().map(|t| t.len()), Some(0), "{toml}");
        let off = GcPolicy {
            disabled: true,
            ..GcPolicy::default()
        };
        assert!(worker_config_toml(&off)
            .unwrap()
            .contains("[gc]\nenabled = false\n"));
    }

    #[test]
    fn output_is_valid_toml() {
        let gc = GcPolicy {
            min_free_space: Some("5%".into()),
            rules: vec![GcRule {
                all: true,
                filters: vec!["label~=a\\b\n".into()],
                reserved_space: Some("1k".into()),
                ..GcRule::default()
            }],
            ..GcPolicy::default()
        };
        let v: toml::Value = toml::from_str(&worker_config_toml(&gc).unwrap()).unwrap();
        assert_eq!(v["gc"]["enabled"].as_bool(), Some(true));
        assert_eq!(v["gc"]["min-free-space"].as_str(), Some("5%"));
        let rule = &v["gc"]["rules"][0];
        assert_eq!(rule["all"].as_bool(), Some(true));
        assert_eq!(rule["filters"][0].as_str(), Some("label~=a\\b\n"));
        assert_eq!(rule["reserved-space"].as_str(), Some("1024"));
    }

    #[test]
    fn bad_rule_names_its_index() {
        let gc = GcPolicy {
            rules: vec![
                GcRule::default(),
                GcRule {
                    min_free_space: Some("lots".into()),
                    ..GcRule::default()
                },
            ],
            ..GcPolicy::default()
        };
        let e = worker_config_toml(&gc).unwrap_err().to_string();
        assert!(e.contains("spec.gc.rules[1].minFreeSpace"), "{e}");
    }

    #[test]
    fn bad_filter_names_its_rule() {
        let gc = GcPolicy {
            rules: vec![GcRule {
                filters: vec!["type==source.local".into(), "not a filter".into()],
                ..GcRule::default()
            }],
            ..GcPolicy::default()
        };
        let e = worker_config_toml(&gc).unwrap_err().to_string();
        assert!(e.contains("spec.gc.rules[0].filters"), "{e}");
        assert!(e.contains("not a filter"), "{e}");
    }
}
