//! Hashing a model on disk the way `model_signing` serializes it by files.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use super::SigningError;
use super::statement::model_path_order;
use crate::digest::{Sha256Hex, sha256_reader};

/// The paths `model_signing` leaves out of a directory model by default (`--ignore-git-paths`),
/// relative to the model root. A single-file model ignores nothing.
pub const GIT_IGNORED_PATHS: [&str; 4] = [".git", ".gitattributes", ".github", ".gitignore"];

/// Hashes a model the way `model_signing` does with its defaults: a single file gives one entry
/// named `"."`; a directory gives every regular file below it (hidden ones included) by its
/// path relative to the root with `/` separators, leaving out [`GIT_IGNORED_PATHS`] at the top
/// level. Sorted in [`model_path_order`](super::model_path_order). Symbolic links and special
/// files are refused, as `model_signing` does unless told `--allow_symlinks`.
pub fn hash_model_path(path: &Path) -> Result<Vec<(String, Sha256Hex)>, SigningError> {
    hash_model_path_ignoring(path, &[])
}

/// [`hash_model_path`], also leaving out `ignored` paths (relative to the model root, `/`
/// separators; a directory leaves out everything below it). Entries that are empty, `.` or
/// climb out with `..` are disregarded. This is how a signature's recorded `ignore_paths`
/// (for example a `model.sig` written inside the model) are honoured.
pub fn hash_model_path_ignoring(
    path: &Path,
    ignored: &[&str],
) -> Result<Vec<(String, Sha256Hex)>, SigningError> {
    let meta = fs::symlink_metadata(path).map_err(|source| SigningError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(invalid(path, "it is a symbolic link"));
    }
    if meta.is_file() {
        return Ok(vec![(".".to_string(), hash_file(path)?)]);
    }
    if !meta.is_dir() {
        return Err(invalid(path, "it is neither a file nor a directory"));
    }
    let ignored: Vec<Vec<&str>> = GIT_IGNORED_PATHS
        .iter()
        .chain(ignored)
        .filter_map(|p| ignore_components(p))
        .collect();
    let mut files = Vec::new();
    walk(path, &mut Vec::new(), &ignored, &mut files)?;
    files.sort_by(|a, b| model_path_order(&a.0, &b.0));
    Ok(files)
}

fn walk(
    dir: &Path,
    prefix: &mut Vec<String>,
    ignored: &[Vec<&str>],
    files: &mut Vec<(String, Sha256Hex)>,
) -> Result<(), SigningError> {
    let entries = fs::read_dir(dir).map_err(|source| SigningError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| SigningError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            return Err(invalid(&path, "its name is not valid UTF-8"));
        };
        prefix.push(name);
        let skip = ignored
            .iter()
            .any(|ignore| prefix.len() >= ignore.len() && prefix[..ignore.len()] == ignore[..]);
        if !skip {
            let file_type = entry.file_type().map_err(|source| SigningError::Io {
                path: path.clone(),
                source,
            })?;
            if file_type.is_symlink() {
                return Err(invalid(&path, "it is a symbolic link"));
            } else if file_type.is_dir() {
                walk(&path, prefix, ignored, files)?;
            } else if file_type.is_file() {
                files.push((prefix.join("/"), hash_file(&path)?));
            } else {
                return Err(invalid(&path, "it is neither a file nor a directory"));
            }
        }
        prefix.pop();
    }
    Ok(())
}

/// `a/./b/` → `["a", "b"]`; `None` for paths that would ignore the whole model or leave it.
fn ignore_components(path: &str) -> Option<Vec<&str>> {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    (!parts.is_empty() && !parts.contains(&"..") && !path.starts_with('/')).then_some(parts)
}

fn hash_file(path: &Path) -> Result<Sha256Hex, SigningError> {
    let io_error = |source| SigningError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_error)?;
    Ok(sha256_reader(file).map_err(io_error)?.0)
}

fn invalid(path: &Path, reason: &str) -> SigningError {
    SigningError::InvalidModelPath {
        path: PathBuf::from(path),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> Sha256Hex {
        sha256_reader(bytes).unwrap().0
    }

    #[test]
    fn a_directory_hashes_like_model_signing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (name, body) in [
            ("a/b", "1"),
            ("a.b", "2"),
            ("a-b", "3"),
            (".hidden", "4"),
            (".github/x", "5"),
            (".git/HEAD", "6"),
            (".gitignore", "7"),
            ("sub/.git/HEAD", "8"),
            ("model.sig", "9"),
        ] {
            let path = root.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, body).unwrap();
        }
        fs::create_dir(root.join("empty")).unwrap();
        let names = |files: Vec<(String, Sha256Hex)>| -> Vec<String> {
            files.into_iter().map(|(n, _)| n).collect()
        };
        assert_eq!(
            names(hash_model_path(root).unwrap()),
            [".hidden", "a/b", "a-b", "a.b", "model.sig", "sub/.git/HEAD"]
        );
        let files =
            hash_model_path_ignoring(root, &["model.sig", "./sub/", "../a.b", "."]).unwrap();
        assert_eq!(files[0], (".hidden".to_string(), sha(b"4")));
        assert_eq!(names(files), [".hidden", "a/b", "a-b", "a.b"]);
    }

    #[test]
    fn a_single_file_is_named_dot_and_ignores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(".gitignore");
        fs::write(&file, "x").unwrap();
        assert_eq!(
            hash_model_path(&file).unwrap(),
            vec![(".".to_string(), sha(b"x"))]
        );
    }

    #[cfg(unix)]
    #[test]
    fn symbolic_links_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("real"), "x").unwrap();
        std::os::unix::fs::symlink("real", dir.path().join("link")).unwrap();
        assert!(matches!(
            hash_model_path(dir.path()),
            Err(SigningError::InvalidModelPath { .. })
        ));
        assert!(matches!(
            hash_model_path(&dir.path().join("link")),
            Err(SigningError::InvalidModelPath { .. })
        ));
        assert!(matches!(
            hash_model_path(&dir.path().join("missing")),
            Err(SigningError::Io { .. })
        ));
    }
}
