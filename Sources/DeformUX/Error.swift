/// The one error type of the engine. Every message names the operation, what was expected and what
/// came, so that it can be shown to a user as it is (the C ABI passes it on; Python raises it).
public enum DeformUXError: Error, CustomStringConvertible, Equatable {
    /// A bad size, option or value.
    case invalidArgument(String)
    /// Sizes that do not fit together.
    case shapeMismatch(String)
    case outOfMemory(String)
    case io(String)
    case cancelled(String)
    case `internal`(String)

    public var message: String {
        switch self {
        case .invalidArgument(let m), .shapeMismatch(let m), .outOfMemory(let m),
             .io(let m), .cancelled(let m), .internal(let m):
            return m
        }
    }

    public var description: String { message }
}
