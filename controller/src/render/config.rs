//! The worker ConfigMap: `worker.toml` holding the pool's GC policy (BuildKit's GC settings,
//! under the kebab-case keys of the worker's `--config` file), with sizes and durations
//! validated and written canonically.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use k8s_openapi::api::core::v1::ConfigMap;

use super::{config_map_name, Context, CONFIG_FILE};
use crate::crd::GcPolicy;
use crate::units::{format_duration_secs, parse_duration, Size};
use crate::Result;

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
    out.push_str("[gc]\n");
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(out, "enabled = {}", !gc.disabled);
    let prefix = "spec.gc";
    limits(
        &mut out,
        prefix,
        Limits {
            keep_duration: gc.keep_duration.as_deref(),
            reserved_space: gc.reserved_space.as_deref(),
            max_used_space: gc.max_used_space.as_deref(),
            min_free_space: gc.min_free_space.as_deref(),
        },
    )?;
    for (i, rule) in gc.rules.iter().enumerate() {
        let _ = writeln!(out, "\n[[gc.rules]]");
        let _ = writeln!(out, "all = {}", rule.all);
        let filters: Vec<String> = rule.filters.iter().map(|f| toml_string(f)).collect();
        let _ = writeln!(out, "filters = [{}]", filters.join(", "));
        limits(
            &mut out,
            &format!("{prefix}.rules[{i}]"),
            Limits {
                keep_duration: rule.keep_duration.as_deref(),
                reserved_space: rule.reserved_space.as_deref(),
                max_used_space: rule.max_used_space.as_deref(),
                min_free_space: rule.min_free_space.as_deref(),
            },
        )?;
    }
    Ok(out)
}

struct Limits<'a> {
    keep_duration: Option<&'a str>,
    reserved_space: Option<&'a str>,
    max_used_space: Option<&'a str>,
    min_free_space: Option<&'a str>,
}

fn limits(out: &mut String, prefix: &str, l: Limits<'_>) -> Result<()> {
    if let Some(d) = l.keep_duration {
        let d = parse_duration(d, &format!("{prefix}.keepDuration"))?;
        let _ = writeln!(
            out,
            "keep-duration = {}",
            toml_string(&format_duration_secs(d))
        );
    }
    for (field, key, value) in [
        ("reservedSpace", "reserved-space", l.reserved_space),
        ("maxUsedSpace", "max-used-space", l.max_used_space),
        ("minFreeSpace", "min-free-space", l.min_free_space),
    ] {
        if let Some(v) = value {
            let size = Size::parse(v, &format!("{prefix}.{field}"))?;
            let _ = writeln!(out, "{key} = {}", toml_string(&size.to_string()));
        }
    }
    Ok(())
}

/// A TOML basic string: JSON string escapes are a subset TOML accepts.
fn toml_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
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
                filters: vec!["type==source.local".into(), "say \"hi\"".into()],
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
            toml.contains("[[gc.rules]]\nall = false\nfilters = [\"type==source.local\", \"say \\\"hi\\\"\"]\nkeep-duration = \"172800s\"\nmax-used-space = \"536870912\"\n"),
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
}
