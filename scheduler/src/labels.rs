//! Which `runs-on` labels make a job Hopper's, and which VM it asks for.
//!
//! Grammar (prefix defaults to `hopper`, compared case-insensitively like GitHub does):
//! - `hopper`                      — a Hopper job with the default shape and image
//! - `hopper-<N>cpu-<M>gb`         — the VM shape: N vCPUs (1..=64), M GiB memory (1..=512)
//! - `hopper-<image>`              — the guest image, e.g. `hopper-ubuntu-24.04`
//!
//! A job is Hopper's when any label is `hopper` or starts with `hopper-`. At most one shape
//! and one image label; anything starting with `hopper-<digit>` must be a valid shape. Other
//! labels (`self-hosted`, `linux`, …) may appear too; they are given to the JIT runner as is.

pub use hopper_api::shape::{Shape, DEFAULT_IMAGE, DEFAULT_SHAPE, MAX_MEMORY_GB, MAX_VCPUS};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HopperSpec {
    pub shape: Shape,
    pub image: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelMatch {
    /// No label names Hopper: not our job.
    NotHopper,
    Hopper(HopperSpec),
    /// Names Hopper but cannot be run; the reason says why (logged and shown in the API).
    Invalid(String),
}

pub fn classify(prefix: &str, labels: &[String]) -> LabelMatch {
    let prefix = prefix.to_ascii_lowercase();
    let dash = format!("{prefix}-");
    let mut hopper = false;
    let mut shape: Option<Shape> = None;
    let mut image: Option<String> = None;
    for label in labels {
        let label = label.to_ascii_lowercase();
        if label == prefix {
            hopper = true;
            continue;
        }
        let Some(rest) = label.strip_prefix(&dash) else {
            continue;
        };
        hopper = true;
        if rest.starts_with(|c: char| c.is_ascii_digit()) {
            let parsed = match parse_shape(rest) {
                Some(s) => s,
                None => {
                    return LabelMatch::Invalid(format!(
                        "unknown shape label `{label}`: expected {prefix}-<N>cpu-<M>gb with \
                         1 <= N <= {MAX_VCPUS} and 1 <= M <= {MAX_MEMORY_GB}"
                    ))
                }
            };
            if shape.replace(parsed).is_some() {
                return LabelMatch::Invalid("more than one shape label".into());
            }
        } else if valid_image(rest) {
            if image.replace(rest.to_string()).is_some() {
                return LabelMatch::Invalid("more than one image label".into());
            }
        } else {
            return LabelMatch::Invalid(format!("invalid image label `{label}`"));
        }
    }
    if !hopper {
        return LabelMatch::NotHopper;
    }
    LabelMatch::Hopper(HopperSpec {
        shape: shape.unwrap_or(DEFAULT_SHAPE),
        image: image.unwrap_or_else(|| DEFAULT_IMAGE.to_string()),
    })
}

fn parse_shape(s: &str) -> Option<Shape> {
    let (cpu, mem) = s.split_once("cpu-")?;
    let mem = mem.strip_suffix("gb")?;
    let all_digits =
        |x: &str| !x.is_empty() && x.len() <= 4 && x.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(cpu) || !all_digits(mem) {
        return None;
    }
    Shape::new(cpu.parse().ok()?, mem.parse().ok()?).ok()
}

fn valid_image(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(labels: &[&str]) -> LabelMatch {
        classify(
            "hopper",
            &labels.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    }

    #[test]
    fn grammar() {
        assert_eq!(c(&["ubuntu-latest"]), LabelMatch::NotHopper);
        assert_eq!(c(&["hoppers"]), LabelMatch::NotHopper);
        assert_eq!(
            c(&["hopper"]),
            LabelMatch::Hopper(HopperSpec {
                shape: DEFAULT_SHAPE,
                image: DEFAULT_IMAGE.into()
            })
        );
        assert_eq!(
            c(&["self-hosted", "Hopper-4CPU-8GB", "hopper-debian-12"]),
            LabelMatch::Hopper(HopperSpec {
                shape: Shape::new(4, 8).unwrap(),
                image: "debian-12".into()
            })
        );
        for bad in [
            "hopper-0cpu-1gb",
            "hopper-4cpu",
            "hopper-65cpu-8gb",
            "hopper-4cpu-8gbx",
            "hopper-4cpu-1000gb",
        ] {
            assert!(matches!(c(&[bad]), LabelMatch::Invalid(_)), "{bad}");
        }
        assert!(matches!(
            c(&["hopper-2cpu-4gb", "hopper-4cpu-8gb"]),
            LabelMatch::Invalid(_)
        ));
        assert!(matches!(
            c(&["hopper-a", "hopper-b"]),
            LabelMatch::Invalid(_)
        ));
        assert!(matches!(c(&["hopper-ubuntu 24"]), LabelMatch::Invalid(_)));
    }

    #[test]
    fn custom_prefix() {
        let labels = vec!["ci-8cpu-16gb".to_string()];
        assert!(matches!(classify("ci", &labels), LabelMatch::Hopper(_)));
        assert_eq!(classify("hopper", &labels), LabelMatch::NotHopper);
    }
}
