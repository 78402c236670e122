// A `pub` task names its argument types in its public `Task` impl, so they must be `pub` too.
mod jobs {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Order {
        id: u64,
    }

    #[multiproc::task]
    pub fn ship(order: Order) -> u64 {
        order.id
    }
}

fn main() {}
