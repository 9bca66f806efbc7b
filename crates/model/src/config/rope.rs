//! Rope settings from a Hugging Face `config.json`: transformers v4's `rope_theta` /
//! `rope_scaling` (plus Gemma 3's `rope_local_base_freq`) and v5's `rope_parameters`, flat or
//! per layer type (`{"full_attention": {...}, "sliding_attention": {...}}`). Conflicts, unknown
//! rope types and unknown keys are errors: a rope setting is never defaulted silently.

use crate::error::{ModelError, Result};

use super::{unsupported, JsonMap};

/// Llama-3 style frequency-dependent rope scaling (`rope_type == "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// YaRN (`rope_type == "yarn"`): a ramp between interpolated and original frequencies, and
/// cos/sin multiplied by `attention_factor`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct YarnRopeScaling {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Resolved as transformers does (from `mscale`/`mscale_all_dim` or `0.1 ln(factor) + 1`).
    pub attention_factor: f64,
    pub truncate: bool,
}

/// Phi-3's LongRoPE (`rope_type == "longrope"`): per-frequency divisors, `short_factor` within
/// the original context and `long_factor` beyond it, and cos/sin multiplied by
/// `attention_factor`.
#[derive(Debug, Clone, PartialEq)]
pub struct LongRopeScaling {
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
    pub original_max_position_embeddings: usize,
    /// Resolved as transformers does (`sqrt(1 + ln(factor) / ln(original))`).
    pub attention_factor: f64,
}

impl YarnRopeScaling {
    /// transformers' `get_mscale`: the cos/sin gain of a YaRN `factor` (`mscale` scales the
    /// log term; 1 in the plain form).
    pub fn mscale(factor: f64, mscale: f64) -> f64 {
        if factor <= 1.0 {
            1.0
        } else {
            0.1 * mscale * factor.ln() + 1.0
        }
    }
}

impl LongRopeScaling {
    /// The cos/sin gain transformers gives LongRoPE when none is set: `sqrt(1 + ln(factor) /
    /// ln(original))`, 1 without extension.
    pub fn default_attention_factor(factor: f64, original: usize) -> f64 {
        if factor <= 1.0 {
            1.0
        } else {
            (1.0 + factor.ln() / (original as f64).ln()).sqrt()
        }
    }
}

/// How the inverse frequencies are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Llama3(Llama3RopeScaling),
    /// `rope_type == "linear"`: positions divided by `factor`.
    Linear {
        factor: f64,
    },
    Yarn(YarnRopeScaling),
    LongRope(LongRopeScaling),
}

/// One rope table's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    pub scaling: Option<RopeScaling>,
}

/// The model's rope: one spec, or (Gemma 3) one for full-attention layers and one for
/// sliding-window layers.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSettings {
    pub global: RopeSpec,
    pub local: Option<RopeSpec>,
}

/// A number-valued key of a rope object, or an error naming it.
pub(super) fn number(obj: &JsonMap, key: &str, whose: &str) -> Result<Option<f64>> {
    match obj.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| ModelError::Config(format!("{whose}.{key} must be a number"))),
    }
}

/// Read the rope settings of `obj` (a whole config.json). `per_layer_type` says whether the
/// family has local and global layers with their own rope (Gemma 3); `default_theta` is the
/// family's theta when none is given, `max_positions` YaRN's fallback original length.
pub(super) fn rope_settings(
    obj: &JsonMap,
    per_layer_type: bool,
    default_theta: f64,
    max_positions: usize,
) -> Result<RopeSettings> {
    let v4_theta = number(obj, "rope_theta", "config")?;
    // Phi-3 keeps `original_max_position_embeddings` beside its rope settings.
    let original = number(obj, "original_max_position_embeddings", "config")?
        .filter(|x| *x > 0.0)
        .map(|x| x as usize);
    let max_positions = (max_positions, original);
    let v4_scaling = obj.get("rope_scaling").filter(|v| !v.is_null());
    let v4_local = number(obj, "rope_local_base_freq", "config")?;
    if v4_local.is_some() && !per_layer_type {
        return Err(unsupported(
            "rope_local_base_freq is set, but this family has no local layers".into(),
        ));
    }
    let v5 = obj.get("rope_parameters").filter(|v| !v.is_null());
    let Some(params) = v5 else {
        let global = match v4_scaling {
            Some(s) => spec(
                as_object(s, "rope_scaling")?,
                v4_theta,
                default_theta,
                "rope_scaling",
                max_positions,
            )?,
            None => RopeSpec {
                theta: v4_theta.unwrap_or(default_theta),
                scaling: None,
            },
        };
        let local = per_layer_type.then(|| RopeSpec {
            theta: v4_local.unwrap_or(10_000.0),
            scaling: None,
        });
        return Ok(RopeSettings { global, local });
    };
    let p = as_object(params, "rope_parameters")?;
    if !p.is_empty() && p.values().all(serde_json::Value::is_object) {
        if !per_layer_type {
            return Err(unsupported(format!(
                "per-layer-type rope parameters ({}) are not supported for this family",
                p.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        if v4_scaling.is_some() || v4_theta.is_some() || v4_local.is_some() {
            return Err(ModelError::Config(
                "config.json: both v4 rope keys and per-layer-type rope_parameters are set".into(),
            ));
        }
        if let Some(k) = p
            .keys()
            .find(|k| *k != "full_attention" && *k != "sliding_attention")
        {
            return Err(unsupported(format!(
                "rope_parameters.{k}: unknown layer type"
            )));
        }
        let layer = |name: &str, theta: f64| -> Result<RopeSpec> {
            match p.get(name) {
                Some(v) => spec(
                    as_object(v, name)?,
                    None,
                    theta,
                    &format!("rope_parameters.{name}"),
                    max_positions,
                ),
                None => Ok(RopeSpec {
                    theta,
                    scaling: None,
                }),
            }
        };
        return Ok(RopeSettings {
            global: layer("full_attention", default_theta)?,
            local: Some(layer("sliding_attention", 10_000.0)?),
        });
    }
    let theta = number(p, "rope_theta", "rope_parameters")?;
    if let (Some(a), Some(b)) = (theta, v4_theta) {
        if a != b {
            return Err(ModelError::Config(format!(
                "config.json: rope_theta {b} and rope_parameters.rope_theta {a} disagree"
            )));
        }
    }
    // Only a theta may sit beside a v4 rope_scaling: the scaling is said once.
    if v4_scaling.is_some() && p.keys().any(|k| k != "rope_theta") {
        return Err(ModelError::Config(
            "config.json: both rope_scaling and rope_parameters set the rope scaling".into(),
        ));
    }
    let global = match v4_scaling {
        Some(s) => spec(
            as_object(s, "rope_scaling")?,
            theta.or(v4_theta),
            default_theta,
            "rope_scaling",
            max_positions,
        )?,
        None => spec(p, v4_theta, default_theta, "rope_parameters", max_positions)?,
    };
    let local = per_layer_type.then(|| RopeSpec {
        theta: v4_local.unwrap_or(10_000.0),
        scaling: None,
    });
    Ok(RopeSettings { global, local })
}

fn as_object<'a>(v: &'a serde_json::Value, whose: &str) -> Result<&'a JsonMap> {
    v.as_object()
        .ok_or_else(|| ModelError::Config(format!("config.json: {whose} must be an object")))
}

/// One rope object (`rope_type` and its parameters; a `rope_theta` inside wins over `theta`).
fn spec(
    s: &JsonMap,
    theta: Option<f64>,
    default_theta: f64,
    whose: &str,
    (max_positions, top_level_original): (usize, Option<usize>),
) -> Result<RopeSpec> {
    let theta = number(s, "rope_theta", whose)?
        .or(theta)
        .unwrap_or(default_theta);
    if theta <= 0.0 {
        return Err(ModelError::Config(format!(
            "rope_theta {theta} must be positive"
        )));
    }
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or("default");
    // `partial_rotary_factor` is checked against the config's by the family reader.
    const COMMON: [&str; 4] = ["rope_type", "type", "rope_theta", "partial_rotary_factor"];
    let allowed: &[&str] = match kind {
        "default" => &[],
        "linear" => &["factor"],
        "llama3" => &[
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ],
        "yarn" => &[
            "factor",
            "original_max_position_embeddings",
            "beta_fast",
            "beta_slow",
            "attention_factor",
            "mscale",
            "mscale_all_dim",
            "truncate",
        ],
        "longrope" => &[
            "short_factor",
            "long_factor",
            "factor",
            "attention_factor",
            "original_max_position_embeddings",
        ],
        other => {
            return Err(unsupported(format!(
                "rope type `{other}` is not supported (supported: default, linear, llama3, yarn, longrope)"
            )))
        }
    };
    if let Some(k) = s
        .keys()
        .find(|k| !COMMON.contains(&k.as_str()) && !allowed.contains(&k.as_str()))
    {
        return Err(unsupported(format!(
            "{whose}.{k} is not understood for rope type `{kind}`"
        )));
    }
    let positive = |k: &str| -> Result<Option<f64>> {
        match number(s, k, whose)? {
            Some(x) if x <= 0.0 => Err(ModelError::Config(format!(
                "{whose}.{k} must be a positive number"
            ))),
            other => Ok(other),
        }
    };
    let need = |k: &str| -> Result<f64> {
        positive(k)?.ok_or_else(|| {
            ModelError::Config(format!("{whose}.{k} is required for rope type `{kind}`"))
        })
    };
    let scaling = match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: need("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3(Llama3RopeScaling {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")? as usize,
        })),
        "longrope" => {
            let factors = |k: &str| -> Result<Vec<f64>> {
                let list = s
                    .get(k)
                    .and_then(serde_json::Value::as_array)
                    .ok_or_else(|| {
                        ModelError::Config(format!("{whose}.{k} must be a list of numbers"))
                    })?;
                list.iter()
                    .map(|v| {
                        v.as_f64()
                            .filter(|x| *x > 0.0 && x.is_finite())
                            .ok_or_else(|| {
                                ModelError::Config(format!(
                                    "{whose}.{k} must hold positive numbers"
                                ))
                            })
                    })
                    .collect()
            };
            let original = positive("original_max_position_embeddings")?
                .map(|x| x as usize)
                .or(top_level_original)
                .ok_or_else(|| {
                    ModelError::Config(format!(
                        "{whose}: longrope needs original_max_position_embeddings"
                    ))
                })?;
            let factor = positive("factor")?.unwrap_or(max_positions as f64 / original as f64);
            let attention_factor = match positive("attention_factor")? {
                Some(a) => a,
                None => LongRopeScaling::default_attention_factor(factor, original),
            };
            Some(RopeScaling::LongRope(LongRopeScaling {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            }))
        }
        _ => {
            let original =
                positive("original_max_position_embeddings")?.map_or(max_positions, |x| x as usize);
            let factor = match positive("factor")? {
                Some(f) => f,
                None => max_positions as f64 / original as f64,
            };
            let get_mscale = YarnRopeScaling::mscale;
            let attention_factor = match positive("attention_factor")? {
                Some(a) => a,
                None => match (positive("mscale")?, positive("mscale_all_dim")?) {
                    (Some(m), Some(all)) => get_mscale(factor, m) / get_mscale(factor, all),
                    _ => get_mscale(factor, 1.0),
                },
            };
            let truncate = match s.get("truncate") {
                None | Some(serde_json::Value::Null) => true,
                Some(v) => v.as_bool().ok_or_else(|| {
                    ModelError::Config(format!("{whose}.truncate must be a boolean"))
                })?,
            };
            Some(RopeScaling::Yarn(YarnRopeScaling {
                factor,
                original_max_position_embeddings: original,
                beta_fast: positive("beta_fast")?.unwrap_or(32.0),
                beta_slow: positive("beta_slow")?.unwrap_or(1.0),
                attention_factor,
                truncate,
            }))
        }
    };
    Ok(RopeSpec { theta, scaling })
}
