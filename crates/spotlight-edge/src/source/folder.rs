//! A folder of PNG/JPEG images; the parent directory name is the label when it names a
//! category (compared ignoring case and punctuation, so `T-shirt_top/` matches
//! `T-shirt/top`).

use std::path::{Path, PathBuf};

/// File extensions read as images (compared case-insensitively).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

/// Lists image files under `root`, recursively, sorted by path. Hidden entries are skipped.
pub fn list_images(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            if path.is_dir() {
                dirs.push(path);
            } else if is_image_path(&path) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Whether the extension is one of [`IMAGE_EXTENSIONS`].
pub fn is_image_path(path: &Path) -> bool {
    path.extension().is_some_and(|e| {
        let e = e.to_string_lossy().to_ascii_lowercase();
        IMAGE_EXTENSIONS.contains(&e.as_str())
    })
}

/// Lower-case letters and digits only.
fn normalise(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// The category whose name matches the file's parent directory name, if any.
pub fn label_for(path: &Path, categories: &[String]) -> Option<usize> {
    let dir = path.parent()?.file_name()?.to_string_lossy();
    if let Some(i) = categories.iter().position(|c| c.as_str() == dir) {
        return Some(i);
    }
    let key = normalise(&dir);
    if key.is_empty() {
        return None;
    }
    categories.iter().position(|c| normalise(c) == key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn categories() -> Vec<String> {
        ["T-shirt/top", "Trouser", "Ankle boot"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn parent_directory_names_map_to_categories() {
        let c = categories();
        assert_eq!(label_for(Path::new("data/Trouser/1.png"), &c), Some(1));
        assert_eq!(label_for(Path::new("data/trouser/1.png"), &c), Some(1));
        assert_eq!(label_for(Path::new("data/T-shirt_top/a.jpg"), &c), Some(0));
        assert_eq!(label_for(Path::new("data/ankle-boot/x.jpeg"), &c), Some(2));
        assert_eq!(label_for(Path::new("data/misc/x.png"), &c), None);
        assert_eq!(label_for(Path::new("x.png"), &c), None);
        assert_eq!(label_for(Path::new("data/---/x.png"), &c), None);
    }

    #[test]
    fn only_png_and_jpeg_extensions_are_images() {
        assert!(is_image_path(Path::new("a/b.PNG")));
        assert!(is_image_path(Path::new("a/b.jpeg")));
        assert!(!is_image_path(Path::new("a/b.txt")));
        assert!(!is_image_path(Path::new("a/png")));
    }
}
