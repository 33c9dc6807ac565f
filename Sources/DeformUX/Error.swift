/// The one error type of the engine (STYLE.md habit 12).
///
/// An error carries structured fields: its `kind` (which the C ABI maps to a status code and Python to
/// an exception class), the `operation` that failed as the caller named it ("deform_conv3d",
/// "DeformUXNet.forward", "safetensors"), a `message` saying what was wrong, and where it applies what
/// was `expected` and what was `got`, the file `path` and the system's `errno`. The C ABI replaces the
/// operation with its entry point's name (`renamed(operation:)`) instead of rewriting message text.
/// `description` ("operation: message: expected E, got G") is shown to users as it is.
public struct DeformUXError: Error, Equatable, Sendable, CustomStringConvertible {
    /// What kind of failure; the raw values are the C ABI's status codes (deformux.h).
    public enum Kind: Int32, Sendable, Equatable {
        /// A bad size, option or value.
        case invalidArgument = 1
        /// Sizes that do not fit together.
        case shapeMismatch = 2
        case outOfMemory = 3
        /// A file could not be read or written, or is damaged; `path` and `errno` say which and why.
        case io = 4
        case cancelled = 5
        /// A broken invariant of the engine itself (a bug).
        case `internal` = 6
        /// The object is in use by another call (or by this thread, re-entrantly).
        case busy = 7
    }

    public var kind: Kind
    public var operation: String
    public var message: String
    public var expected: String?
    public var got: String?
    public var path: String?
    /// The C library's errno for io failures (ENOENT for a missing file), else 0.
    public var errno: Int32

    public init(_ kind: Kind, _ operation: String, _ message: String, expected: String? = nil, got: String? = nil,
                path: String? = nil, errno: Int32 = 0) {
        self.kind = kind
        self.operation = operation
        self.message = message
        self.expected = expected
        self.got = got
        self.path = path
        self.errno = errno
    }

    public static func invalidArgument(_ operation: String, _ message: String, expected: String? = nil,
                                       got: String? = nil) -> DeformUXError {
        DeformUXError(.invalidArgument, operation, message, expected: expected, got: got)
    }

    public static func shapeMismatch(_ operation: String, _ message: String, expected: String? = nil,
                                     got: String? = nil) -> DeformUXError {
        DeformUXError(.shapeMismatch, operation, message, expected: expected, got: got)
    }

    public static func outOfMemory(_ operation: String, _ message: String) -> DeformUXError {
        DeformUXError(.outOfMemory, operation, message)
    }

    public static func io(_ operation: String, _ message: String, path: String? = nil, errno: Int32 = 0,
                          expected: String? = nil, got: String? = nil) -> DeformUXError {
        DeformUXError(.io, operation, message, expected: expected, got: got, path: path, errno: errno)
    }

    public static func cancelled(_ operation: String, _ message: String) -> DeformUXError {
        DeformUXError(.cancelled, operation, message)
    }

    public static func `internal`(_ operation: String, _ message: String) -> DeformUXError {
        DeformUXError(.internal, operation, message)
    }

    public static func busy(_ operation: String, _ message: String) -> DeformUXError {
        DeformUXError(.busy, operation, message)
    }

    /// The same error reported under another operation name (an entry point that called a shared helper).
    public func renamed(operation newName: String) -> DeformUXError {
        var e = self
        e.operation = newName
        return e
    }

    /// "operation: message", then ": expected E, got G" when those fields are set and the message does
    /// not already say them.
    public var description: String {
        var s = operation.isEmpty ? message : (message.isEmpty ? operation : "\(operation): \(message)")
        switch (expected, got) {
        case let (e?, g?): s += "\(message.isEmpty ? "" : ": ")expected \(e), got \(g)"
        case let (e?, nil): s += "\(message.isEmpty ? "" : ": ")expected \(e)"
        case let (nil, g?): s += "\(message.isEmpty ? "" : ": ")got \(g)"
        case (nil, nil): break
        }
        if let path, !s.contains(path) { s += " (file \(path))" }
        return s
    }
}
