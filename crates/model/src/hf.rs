//! Hugging Face model directories (config.json, safetensors, tokenizer files) and downloads of
//! them from the Hub through hf-hub, honouring HF_HOME, HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde_json::Value as Json;
use tokenizers::Tokenizer;

use crate::cpu_bf16::CpuArithmetic;
use crate::error::{ModelError, Result};
use crate::tokenizer::TokenizerBundle;
use crate::weights::{check_shape, WeightSource};

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ModelError::NotFound(path.to_path_buf()),
        _ => ModelError::Io {
            path: path.to_path_buf(),
            source: e,
        },
    })
}

/// A JSON file of a model directory, parsed into `T` (a missing file is `NotFound`).
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    serde_json::from_str(&read_text(path)?).map_err(|e| ModelError::InvalidFile {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A special token in tokenizer_config.json is either a string or `{"content": ...}`.
fn token_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

/// The chat template is a string, or a list of named templates of which we take "default".
fn chat_template(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Array(items) => items
            .iter()
            .find(|i| i.get("name").and_then(Json::as_str) == Some("default"))
            .or_else(|| items.first())
            .and_then(|i| i.get("template"))
            .and_then(Json::as_str)
            .map(str::to_string),
        _ => None,
    }
}

/// The fast tokenizer (`tokenizer.json`) of a model directory.
fn read_tokenizer_json(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(ModelError::Tokenizer(format!(
            "{} is missing: spindle needs a fast tokenizer (tokenizer.json) next to the weights",
            path.display()
        )));
    }
    Tokenizer::from_file(&path).map_err(|e| ModelError::InvalidFile {
        path: path.clone(),
        message: e.to_string(),
    })
}

/// Tokenizer + chat template + special tokens from a model directory.
pub fn load_tokenizer(dir: &Path) -> Result<TokenizerBundle> {
    let tokenizer = read_tokenizer_json(dir)?;
    let config_path = dir.join("tokenizer_config.json");
    let config = if config_path.exists() {
        read_json(&config_path)?
    } else {
        Json::Null
    };
    let mut template = chat_template(config.get("chat_template"));
    let jinja = dir.join("chat_template.jinja");
    if template.is_none() && jinja.exists() {
        template = Some(read_text(&jinja)?);
    }
    let bos_token = token_text(config.get("bos_token"));
    let eos_token = token_text(config.get("eos_token"));
    let bos_token_id = bos_token.as_deref().and_then(|t| tokenizer.token_to_id(t));
    let mut eos_token_ids: Vec<u32> = eos_token
        .as_deref()
        .and_then(|t| tokenizer.token_to_id(t))
        .into_iter()
        .collect();
    let generation = dir.join("generation_config.json");
    if generation.exists() {
        let gen: Json = read_json(&generation)?;
        let ids: Vec<u64> = match gen.get("eos_token_id") {
            Some(Json::Number(n)) => n.as_u64().into_iter().collect(),
            Some(Json::Array(a)) => a.iter().filter_map(Json::as_u64).collect(),
            _ => Vec::new(),
        };
        for id in ids.into_iter().filter_map(|i| u32::try_from(i).ok()) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }
    // HF tokenizers add BOS through their post-processor; we add it ourselves, so honour
    // `add_bos_token` where given and otherwise infer it from the post-processor's template.
    let add_bos_token = config
        .get("add_bos_token")
        .and_then(Json::as_bool)
        .unwrap_or_else(|| {
            bos_token_id.is_some_and(|bos| {
                tokenizer
                    .encode_fast("a", true)
                    .is_ok_and(|e| e.get_ids().first() == Some(&bos))
            })
        });
    // Our encode() adds BOS itself; keep the tokenizer from adding it a second time.
    let mut tokenizer = tokenizer;
    tokenizer.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
    Ok(TokenizerBundle {
        tokenizer,
        chat_template: template,
        bos_token,
        eos_token,
        bos_token_id,
        eos_token_ids,
        add_bos_token,
        post_process_special_tokens: false,
    })
}

/// The tokenizer of an encoder (BERT-style embedding model): special tokens come from its own
/// post-processor (`[CLS] ... [SEP]`), and the truncation and padding that such a
/// `tokenizer.json` often carries (e.g. pad/truncate to 128) are removed, so inputs are never
/// silently cut or padded: length limits are checked by the server.
pub fn load_encoder_tokenizer(dir: &Path) -> Result<TokenizerBundle> {
    let mut tokenizer = read_tokenizer_json(dir)?;
    tokenizer
        .with_truncation(None)
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    tokenizer.with_padding(None);
    Ok(TokenizerBundle {
        tokenizer,
        chat_template: None,
        bos_token: None,
        eos_token: None,
        bos_token_id: None,
        eos_token_ids: Vec::new(),
        add_bos_token: false,
        post_process_special_tokens: true,
    })
}

/// The safetensors files of a directory: a single `model.safetensors` or the shards listed in
/// `model.safetensors.index.json`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let json: Json = read_json(&index)?;
        let map = json
            .get("weight_map")
            .and_then(Json::as_object)
            .ok_or_else(|| ModelError::InvalidFile {
                path: index.clone(),
                message: "no weight_map".into(),
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(Json::as_str)
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        if let Some(missing) = files.iter().find(|f| !f.exists()) {
            return Err(ModelError::NotFound(missing.clone()));
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::NotFound(dir.join("model.safetensors")))
}

/// Memory-mapped safetensors shards served by tensor name.
pub struct SafetensorsWeights {
    files: MmapedSafetensors,
    origin: String,
    dtype: DType,
    device: Device,
    arithmetic: CpuArithmetic,
}

impl SafetensorsWeights {
    pub fn open(dir: &Path, dtype: DType, device: Device) -> Result<Self> {
        let paths = safetensors_files(dir)?;
        // SAFETY: the files are mapped read-only; like every mmap user we rely on nobody
        // truncating them while the server runs.
        let files =
            unsafe { MmapedSafetensors::multi(&paths) }.map_err(|e| ModelError::InvalidFile {
                path: dir.to_path_buf(),
                message: format!("safetensors: {e}"),
            })?;
        Ok(Self {
            files,
            origin: dir.display().to_string(),
            dtype,
            device,
            arithmetic: CpuArithmetic::F32,
        })
    }
}

impl SafetensorsWeights {
    /// Tensor `name` as stored (CPU, its own dtype), checked against `shape`.
    fn load_checked(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if self.files.get(name).is_err() {
            return Err(ModelError::MissingTensor {
                path: self.origin.clone().into(),
                tensor: name.into(),
            });
        }
        let t = self
            .files
            .load(name, &Device::Cpu)
            .map_err(|e| ModelError::InvalidFile {
                path: self.origin.clone().into(),
                message: format!("cannot read tensor '{name}': {e}"),
            })?;
        check_shape(&self.origin, name, &t, shape)?;
        Ok(t)
    }

    /// Multiply the linear layers with `arithmetic` (bf16: a checkpoint's bf16 weights stay
    /// bf16).
    pub fn with_arithmetic(mut self, arithmetic: CpuArithmetic) -> Self {
        self.arithmetic = arithmetic;
        self
    }
}

impl WeightSource for SafetensorsWeights {
    fn arithmetic(&self) -> CpuArithmetic {
        self.arithmetic
    }

    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.load_checked(name, shape)?;
        Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.files.get(name).is_ok()
    }

    fn origin(&self) -> String {
        self.origin.clone()
    }

    fn get_bytes(&mut self, name: &str, shape: &[usize]) -> Result<Vec<u8>> {
        let t = self.load_checked(name, shape)?;
        if t.dtype() != DType::U8 {
            return Err(ModelError::InvalidFile {
                path: self.origin.clone().into(),
                message: format!("tensor '{name}' is {:?}, expected u8", t.dtype()),
            });
        }
        Ok(t.flatten_all()?.to_vec1::<u8>()?)
    }
}

/// `org/name[@revision]`: what a Hub id looks like (and a local path does not).
pub fn parse_repo_id(model: &str) -> Option<(String, Option<String>)> {
    let (repo, revision) = match model.split_once('@') {
        Some((r, rev)) => (r, Some(rev.to_string())),
        None => (model, None),
    };
    let mut parts = repo.split('/');
    let (org, name) = (parts.next()?, parts.next()?);
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (parts.next().is_none() && valid(org) && valid(name) && org != "." && org != "..")
        .then(|| (repo.to_string(), revision))
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes" | "on"))
}

/// Download (or find in the cache) the files of a Hub model and return its snapshot directory.
pub fn fetch_from_hub(repo_id: &str, revision: Option<&str>) -> Result<PathBuf> {
    use hf_hub::{api::sync::ApiBuilder, Cache, Repo, RepoType};
    let revision = revision.unwrap_or("main").to_string();
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.clone());
    let required = ["config.json", "tokenizer.json"];
    let optional = [
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ];

    if env_flag("HF_HUB_OFFLINE") {
        let cached = Cache::from_env().repo(repo);
        let config = cached.get("config.json").ok_or_else(|| {
            ModelError::Hub(format!(
                "HF_HUB_OFFLINE is set and '{repo_id}@{revision}' is not in the local cache ({}). \
                 Unset HF_HUB_OFFLINE to download it, or pass a local .gguf file or model directory.",
                Cache::from_env().path().display()
            ))
        })?;
        let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
        safetensors_files(&dir)?;
        return Ok(dir);
    }

    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| Cache::from_env().token());
    let api = ApiBuilder::from_env()
        .with_token(token)
        .with_progress(true)
        .build()
        .map_err(|e| ModelError::Hub(e.to_string()))?;
    let api_repo = api.repo(repo);
    let unreachable = |file: &str, e: hf_hub::api::sync::ApiError| {
        ModelError::Hub(format!(
            "could not fetch '{file}' of '{repo_id}@{revision}': {e}. If this machine is offline, \
             pass a local .gguf file or model directory as --model (or set HF_HUB_OFFLINE=1 to use \
             the cache); for gated models set HF_TOKEN."
        ))
    };
    let mut dir = None;
    for file in required {
        let path = api_repo.get(file).map_err(|e| unreachable(file, e))?;
        dir = path.parent().map(Path::to_path_buf);
    }
    for file in optional {
        let _ = api_repo.get(file);
    }
    match api_repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let json: Json = read_json(&index)?;
            let mut shards: Vec<String> = json
                .get("weight_map")
                .and_then(Json::as_object)
                .map(|m| {
                    m.values()
                        .filter_map(Json::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for shard in shards {
                api_repo.get(&shard).map_err(|e| unreachable(&shard, e))?;
            }
        }
        Err(_) => {
            api_repo
                .get("model.safetensors")
                .map_err(|e| unreachable("model.safetensors", e))?;
        }
    }
    dir.ok_or_else(|| ModelError::Hub(format!("no files downloaded for '{repo_id}'")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_told_apart_from_paths() {
        assert_eq!(
            parse_repo_id("Qwen/Qwen2.5-0.5B"),
            Some(("Qwen/Qwen2.5-0.5B".into(), None))
        );
        assert_eq!(
            parse_repo_id("meta-llama/Llama-3.1-8B@v1"),
            Some(("meta-llama/Llama-3.1-8B".into(), Some("v1".into())))
        );
        assert_eq!(parse_repo_id("models/x/y.gguf"), None);
        assert_eq!(parse_repo_id("./x"), None);
        assert_eq!(parse_repo_id("/abs/path"), None);
        assert_eq!(parse_repo_id("model.gguf"), None);
    }
}
