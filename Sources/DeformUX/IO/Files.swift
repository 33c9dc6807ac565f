import Glibc

/// The file plumbing every reader and writer of the engine shares (safetensors, NIfTI, model cards):
/// opening a regular file for reading, and writing a file atomically. Errors name the operation and the
/// path and carry errno, so Python raises the matching OSError.
public enum Files {
    /// The text of an errno value.
    public static func errnoText(_ code: Int32) -> String { String(cString: strerror(code)) }

    /// Opens `path` read-only; it must be a regular file (a directory is EISDIR). Returns the
    /// descriptor (the caller closes it) and the file's size in bytes.
    public static func openRegular(_ path: String, what: String) throws -> (fd: Int32, size: Int) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let e = errno
            throw DeformUXError.io(what, "cannot open: \(errnoText(e))", path: path, errno: e)
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = errno
            close(fd)
            throw DeformUXError.io(what, "cannot stat: \(errnoText(e))", path: path, errno: e)
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            close(fd)
            throw DeformUXError.io(what, "not a regular file", path: path, errno: (st.st_mode & S_IFMT) == S_IFDIR ? EISDIR : 0)
        }
        return (fd, Int(st.st_size))
    }

    /// Runs `body` on a new temporary file in `path`'s directory, then fsyncs it and renames it over
    /// `path`; on any error the temporary file is removed and `path` is untouched, so a crash never
    /// leaves a half-written file under the final name.
    public static func atomicWrite(_ path: String, what: String, _ body: (Int32) throws -> Void) throws {
        let directory: String
        if let slash = path.lastIndex(of: "/") {
            directory = slash == path.startIndex ? "/" : String(path[..<slash])
        } else {
            directory = "."
        }
        let base = path.split(separator: "/").last.map(String.init) ?? path
        let temp = "\(directory)/.\(base).tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fd = open(temp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            let e = errno
            throw DeformUXError.io(what, "cannot create a temporary file in \(directory): \(errnoText(e))", path: path, errno: e)
        }
        var closed = false
        var renamed = false
        defer {
            if !closed { close(fd) }
            if !renamed { unlink(temp) }
        }
        try body(fd)
        guard fsync(fd) == 0 else {
            let e = errno
            throw DeformUXError.io(what, "fsync failed: \(errnoText(e))", path: path, errno: e)
        }
        closed = true
        guard close(fd) == 0 else {
            let e = errno
            throw DeformUXError.io(what, "close failed: \(errnoText(e))", path: path, errno: e)
        }
        guard rename(temp, path) == 0 else {
            let e = errno
            throw DeformUXError.io(what, "cannot rename the temporary file to \(path): \(errnoText(e))", path: path, errno: e)
        }
        renamed = true
    }
}
